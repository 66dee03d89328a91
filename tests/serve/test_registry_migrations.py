"""Registry schema migrations (alembic): a registry written before migrations existed upgrades in place,
on SQLite and on PostgreSQL, with every tenant, key, adapter version and lora id intact.

``data/registry-v1.db`` was written by the registry code of commit 4154ec2 (the last one that
created the schema with ``create_all``) through its own API: ``data/make_registry_v1.py``
made it, and ``data/registry-v1.keys.json`` holds the API keys it issued."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from lorafleet.serve import migrations
from lorafleet.serve.registry import AdapterVersion, Registry

DATA = Path(__file__).parent / "data"


def _schema(engine: sa.Engine) -> dict:
    """Tables -> columns (name, type family, nullable), unique constraints and indexed columns, as the database reports them."""
    inspector = sa.inspect(engine)
    out = {}
    for table in sorted(t for t in inspector.get_table_names() if t.startswith("lorafleet_") and t != migrations.VERSION_TABLE):
        columns = [(c["name"], type(c["type"]).__name__.upper().replace("BIGINT", "BIGINTEGER"), c["nullable"]) for c in inspector.get_columns(table)]
        uniques = sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table))
        indexed = sorted(tuple(i["column_names"]) for i in inspector.get_indexes(table) if not i.get("unique"))
        out[table] = (columns, uniques, indexed)
    return out


def _check_v1_content(reg: Registry, keys: dict) -> None:
    assert reg.authenticate(keys["acme_key"]).name == "acme"
    assert reg.authenticate(keys["globex_key"]).name == "globex"
    assert reg.authenticate(keys["revoked_key"]) is None
    tenants = {t.name: (t, ks, n) for t, ks, n in reg.list_tenants()}
    assert tenants["acme"][0].quotas == {"requests_per_minute": 60} and tenants["globex"][0].allow_base is False
    acme, globex = tenants["acme"][0], tenants["globex"][0]
    intent = reg.adapter(acme.id, "intent")
    assert (intent.version, intent.source, intent.pinned, intent.content_hash) == (2, "models:/acme~intent/2", True, "b" * 64)
    summary = reg.adapter(globex.id, "summary")
    assert summary.version == 1 and summary.rank == 8
    return intent, summary


def test_a_sqlite_registry_written_before_migrations_upgrades_in_place(tmp_path):
    path = tmp_path / "registry.db"
    shutil.copy(DATA / "registry-v1.db", path)
    keys = json.loads((DATA / "registry-v1.keys.json").read_text())
    url = f"sqlite:///{path}"
    old = sa.create_engine(url)
    before = _schema(old)
    ids_before = sorted(r[0] for r in old.connect().execute(sa.text("SELECT id FROM lorafleet_adapter_versions")))
    assert migrations.current(old) is None
    reg = Registry(url)
    assert migrations.current(reg.engine) == migrations.head()
    intent, summary = _check_v1_content(reg, keys)
    # lora ids (vLLM's adapter ids) are the version rows' ids: unchanged, and new ones never reuse them
    assert sorted(r[0] for r in old.connect().execute(sa.text("SELECT id FROM lorafleet_adapter_versions"))) == ids_before
    acme = reg.get_tenant("acme")
    _, replaced = reg.replace_adapter(acme.id, "intent", AdapterVersion("models:/acme~intent/3", "/c/d", "d" * 64, 16, 1), expected_version=2)
    assert replaced.version == 3 and replaced.lora_id not in {intent.lora_id, summary.lora_id}
    # the baseline revision is exactly the schema the old code wrote
    if migrations.head() == migrations.BASELINE:
        fresh = Registry(f"sqlite:///{tmp_path}/fresh.db")
        assert _schema(fresh.engine) == before
        fresh.close()
    reg.close()
    # opening again is a no-op
    again = Registry(url)
    assert migrations.current(again.engine) == migrations.head() and again.get_tenant("acme").id == acme.id
    again.close()


@pytest.mark.postgres
def test_a_postgresql_registry_written_before_migrations_upgrades_in_place(postgres_db):
    """The same on PostgreSQL: a registry created at the baseline schema and filled through the API,
    its version table dropped (as a pre-migration server left it), then opened by the current code."""
    engine = sa.create_engine(postgres_db)
    migrations.upgrade(engine, migrations.BASELINE)
    old = Registry.__new__(Registry)  # the API over the baseline schema without running the upgrade
    old.url, old.engine = postgres_db, engine
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO lorafleet_meta (key, value) VALUES ('generation', 0)"))
    tenant, key = old.create_tenant("acme", True, {"requests_per_minute": 60})
    first = old.add_adapter(tenant.id, "intent", AdapterVersion("models:/acme~intent/1", "/c/a", "a" * 64, 16, 10))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {migrations.VERSION_TABLE}"))
    assert migrations.current(engine) is None

    reg = Registry(postgres_db)
    assert migrations.current(reg.engine) == migrations.head()
    assert reg.authenticate(key.secret).name == "acme"
    record = reg.adapter(tenant.id, "intent")
    assert (record.version, record.lora_id, record.source) == (1, first.lora_id, "models:/acme~intent/1")
    _, second = reg.replace_adapter(tenant.id, "intent", AdapterVersion("models:/acme~intent/2", "/c/b", "b" * 64, 16, 10))
    assert second.version == 2 and second.lora_id > first.lora_id
    reg.close()


def test_replicas_opening_a_new_registry_together_all_succeed(tmp_path):
    """Several processes' first start on one new database: the migration runs once, nobody fails."""
    url = f"sqlite:///{tmp_path}/new.db"
    errors, opened = [], []

    def open_it():
        try:
            opened.append(Registry(url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert migrations.current(opened[0].engine) == migrations.head()
    tenant, _ = opened[0].create_tenant("acme")
    assert opened[-1].get_tenant("acme").id == tenant.id
    for reg in opened:
        reg.close()


def _registry_at(url: str, revision: str):
    """A registry as the code of ``revision`` left it: that schema, filled through the API (no upgrade past it)."""
    engine = sa.create_engine(url)
    migrations.upgrade(engine, revision)
    old = Registry.__new__(Registry)
    old.url, old.engine = url, engine
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO lorafleet_meta (key, value) VALUES ('generation', 0)"))
    tenant, key = old.create_tenant("acme", True, {"requests_per_minute": 60})
    old.add_adapter(tenant.id, "intent", AdapterVersion("models:/acme~intent/1", "/c/a", "a" * 64, 16, 10))
    return engine, tenant, key


def _one_file(store, tenant_id: int):
    """A one-line training file stored for the tenant (its record)."""
    upload = store.begin(tenant_id)
    upload.write(b'{"prompt": "a", "completion": "b"}\n')
    return store.commit(upload, "a.jsonl", "fine-tune")


def _upgrades_with_files(url: str, tmp_path) -> None:
    from lorafleet.ftapi.config import FileSettings
    from lorafleet.ftapi.files import FileStore

    engine, tenant, key = _registry_at(url, "0001")
    assert not sa.inspect(engine).has_table("lorafleet_files")
    reg = Registry(url)  # what a server does at start-up
    assert migrations.current(reg.engine) == migrations.head()
    assert reg.authenticate(key.secret).name == "acme" and reg.adapter(tenant.id, "intent").version == 1
    store = FileStore(reg.engine, tmp_path / "files", FileSettings())
    record = _one_file(store, tenant.id)
    assert store.list(tenant.id)[0] == [record] and store.get(tenant.id, record.id).bytes == 35
    reg.close()
    engine.dispose()


def test_a_sqlite_registry_of_0001_gains_the_files_table_in_place(tmp_path):
    _upgrades_with_files(f"sqlite:///{tmp_path}/registry.db", tmp_path)
    # the upgraded schema is the one a new registry gets
    fresh = Registry(f"sqlite:///{tmp_path}/fresh.db")
    assert _schema(fresh.engine) == _schema(sa.create_engine(f"sqlite:///{tmp_path}/registry.db"))
    fresh.close()


@pytest.mark.postgres
def test_a_postgresql_registry_of_0001_gains_the_files_table_in_place(postgres_db, tmp_path):
    _upgrades_with_files(postgres_db, tmp_path)


def _upgrades_with_jobs(url: str, tmp_path) -> None:
    """A registry of 0002 (tenants, adapters, files) gains the fine-tuning tables; its files stay and jobs can use them."""
    from lorafleet.ftapi.config import FileSettings
    from lorafleet.ftapi.files import FileStore
    from lorafleet.ftapi.jobs import JobRecord, JobStore

    engine, tenant, key = _registry_at(url, "0002")
    kept = _one_file(FileStore(engine, tmp_path / "files", FileSettings()), tenant.id)
    assert not sa.inspect(engine).has_table("lorafleet_ft_jobs")
    reg = Registry(url)  # what a server does at start-up
    assert migrations.current(reg.engine) == migrations.head()
    assert reg.authenticate(key.secret).name == "acme" and FileStore(reg.engine, tmp_path / "files", FileSettings()).get(tenant.id, kept.id) == kept
    jobs = JobStore(reg.engine)
    job = jobs.create(JobRecord(JobRecord.new_id(), tenant.id, "tiny", kept.id, None, {"n_epochs": 1}, None, 42, {"run_name": "x"}, None,
                                "validating_files", 1.0), ("Created fine-tuning job",))
    assert jobs.get(tenant.id, job.id) == job and [e.message for e in jobs.events(tenant.id, job.id)[0]] == ["Created fine-tuning job"]
    reg.close()
    engine.dispose()


def test_a_sqlite_registry_of_0002_gains_the_fine_tuning_tables_in_place(tmp_path):
    _upgrades_with_jobs(f"sqlite:///{tmp_path}/registry.db", tmp_path)
    fresh = Registry(f"sqlite:///{tmp_path}/fresh.db")
    assert _schema(fresh.engine) == _schema(sa.create_engine(f"sqlite:///{tmp_path}/registry.db"))
    fresh.close()


@pytest.mark.postgres
def test_a_postgresql_registry_of_0002_gains_the_fine_tuning_tables_in_place(postgres_db, tmp_path):
    _upgrades_with_jobs(postgres_db, tmp_path)
