"""Schema migrations of the tenant/adapter registry (alembic), run by every process that opens it.

``upgrade(engine)`` brings a registry database to the newest revision in ``versions/``:

* a new database gets every revision from the first (``0001`` creates today's tables);
* a database written before migrations existed (tables present, no version table) is stamped
  at ``0001``, the schema it already has, and upgraded from there, in place, with nothing lost;
* replicas starting together serialise on a lock (PostgreSQL: an advisory lock held by the
  migrating transaction; SQLite: the database's write lock, retried while another holds it).

The version table is ``lorafleet_alembic_version``, so a database shared with MLflow (whose
own alembic table is ``alembic_version``) keeps both apart. A schema change is a new file in
``versions/`` (``down_revision`` = the previous head) plus a test that upgrades a database
written by the previous code (tests/serve/test_registry_migrations.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger(__name__)

VERSION_TABLE = "lorafleet_alembic_version"
BASELINE = "0001"
_PG_LOCK_ID = 0x6C6F7261  # "lora": the advisory lock every lorafleet process takes to migrate
_IN_PROCESS = threading.Lock()  # alembic's `context` / `op` proxies are module globals: one migration at a time per process


def _config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(None)).get_current_head()


def current(engine: sa.Engine):
    """The revision the database is at (None: not under migrations yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head", attempts: int = 20) -> None:
    """Migrate the registry at ``engine`` to ``revision`` (see the module docstring)."""
    from alembic import command
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            with _IN_PROCESS, engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
                inspector = sa.inspect(conn)
                cfg = _config(conn)
                if inspector.has_table("lorafleet_tenants") and not inspector.has_table(VERSION_TABLE):
                    log.info("registry %s predates migrations: stamping it at %s", engine.url.render_as_string(hide_password=True), BASELINE)
                    command.stamp(cfg, BASELINE)
                command.upgrade(cfg, revision)
            return
        except OperationalError as exc:
            # SQLite: another process holds the write lock ("database is locked"), or created the
            # tables between our look and our CREATE ("already exists"): look again.
            message = str(exc).lower()
            if not ("locked" in message or "already exists" in message) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
