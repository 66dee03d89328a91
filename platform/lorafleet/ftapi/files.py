"""Where tenants' training files live: a row in the registry database, the content on disk.

The row (``lorafleet_files``, created by migration ``0002``) holds OpenAI's file fields; the
content is ``<root>/<tenant id>/<file id>.jsonl``, a name made of server-made ids only, never of
anything a client sent. Every query is scoped to one tenant (``scope``), or to all of them for
the admin (``scope=None``): another tenant's file is the same "not found" as a missing id.

An upload is written to ``<id>.jsonl.part`` in the tenant's folder while it is checked; only a
checked file within the quotas is committed (row inserted, file renamed) in one transaction, so
a refused upload leaves nothing behind.

Example::

    store = FileStore(registry.engine, Path("state/files"), FileSettings())
    upload = store.begin(tenant_id)          # .part file in the tenant's folder
    upload.write(b'{"prompt": "2+2", "completion": "4"}\\n')
    record = store.commit(upload, "math.jsonl", "fine-tune")
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sqlalchemy as sa

from lorafleet.ftapi.config import FileSettings
from lorafleet.serve.errors import OpenAIError
from lorafleet.serve.registry import tenants_table

log = logging.getLogger(__name__)

files_table = sa.Table(
    "lorafleet_files", sa.MetaData(),
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),  # seconds, sub-second: newest first stays exact
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_details", sa.Text, nullable=True),
)


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: int
    filename: str
    bytes: int
    purpose: str
    sha256: str
    created_at: float
    status: str
    status_details: Optional[str]

    def openai(self) -> dict:
        """The file as OpenAI's ``FileObject``."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": self.status, "status_details": self.status_details, "expires_at": None}


def file_not_found(file_id: str) -> OpenAIError:
    return OpenAIError(404, f"No file with id `{file_id}` among yours (GET /v1/files lists them).", "invalid_request_error", "file_id",
                       "file_not_found")


def over_quota(message: str) -> OpenAIError:
    """429 (the tenant's quota, as for requests per minute) with ``x-should-retry: false``: waiting frees nothing,
    so the openai client must not re-send the upload as it does for other 429s."""
    return OpenAIError(429, message, "invalid_request_error", None, "file_quota_exceeded", {"x-should-retry": "false"})


class Upload:
    """One upload being written: the ``.part`` file in the tenant's folder, its size and sha256."""

    def __init__(self, tenant_id: int, file_id: str, part: Path):
        self.tenant_id, self.id, self.part = tenant_id, file_id, part
        self.bytes = 0
        self._sha = hashlib.sha256()
        self._fh = open(part, "xb")  # x: never follows or overwrites anything already there

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        """Forget the upload (refused or failed): nothing of it stays on disk."""
        self._fh.close()
        self.part.unlink(missing_ok=True)


class FileStore:
    """The files of every tenant: rows in the registry database at ``engine``, content under ``root``."""

    def __init__(self, engine: sa.Engine, root: Path, settings: FileSettings):
        self.engine, self.root, self.settings = engine, Path(root), settings

    def path(self, record: FileRecord) -> Path:
        return self.root / str(record.tenant_id) / f"{record.id}.jsonl"

    # -- quotas

    def usage(self, tenant_id: int) -> tuple[int, int]:
        """(files, bytes) the tenant holds."""
        with self.engine.connect() as conn:
            return self._usage(conn, tenant_id)

    @staticmethod
    def _usage(conn, tenant_id: int) -> tuple[int, int]:
        count, total = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(files_table.c.bytes), 0))
                                    .where(files_table.c.tenant_id == tenant_id)).one()
        return int(count), int(total)

    def check_room(self, tenant_id: int, adding_bytes: int = 0, adding_files: int = 1) -> None:
        """429 when ``adding_files`` more files of ``adding_bytes`` would break the tenant's quotas."""
        with self.engine.connect() as conn:
            self._check_room(conn, tenant_id, adding_bytes, adding_files)

    def _check_room(self, conn, tenant_id: int, adding_bytes: int, adding_files: int) -> None:
        count, total = self._usage(conn, tenant_id)
        s = self.settings
        if s.max_files is not None and count + adding_files > s.max_files:
            raise over_quota(f"You hold {count} files, this server's quota per tenant is {s.max_files} (files.max_files); "
                             "delete some (DELETE /v1/files/{file_id}) before uploading more.")
        if s.max_total_bytes is not None and total + adding_bytes > s.max_total_bytes:
            raise over_quota(f"Your files hold {total} bytes; with this one ({adding_bytes} bytes) they would pass this server's quota "
                             f"of {s.max_total_bytes} bytes per tenant (files.max_total_bytes); delete some files first.")

    # -- uploads

    def begin(self, tenant_id: int) -> Upload:
        folder = self.root / str(tenant_id)
        folder.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{secrets.token_hex(12)}"
        return Upload(tenant_id, file_id, folder / f"{file_id}.jsonl.part")

    def commit(self, upload: Upload, filename: str, purpose: str) -> FileRecord:
        """Record a checked upload within the tenant's quotas (429 otherwise, the upload discarded)."""
        upload.close()
        record = FileRecord(upload.id, upload.tenant_id, filename, upload.bytes, purpose, upload.sha256, time.time(), "processed", None)
        final = self.path(record)
        try:
            with self.engine.begin() as conn:
                # Insert, then count: concurrent uploads of one tenant cannot both pass the quota. SQLite: the INSERT
                # takes the database's write lock first. PostgreSQL: the tenant's row lock orders them, and the count
                # (a new snapshot per statement) sees every upload committed before.
                conn.execute(files_table.insert().values(**record.__dict__))
                conn.execute(sa.select(tenants_table.c.id).where(tenants_table.c.id == upload.tenant_id).with_for_update())
                self._check_room(conn, upload.tenant_id, 0, 0)  # the new row is counted already
                os.replace(upload.part, final)
        except BaseException:
            upload.discard()
            final.unlink(missing_ok=True)
            raise
        return record

    # -- reads and deletes

    @staticmethod
    def _record(row) -> FileRecord:
        return FileRecord(**row._mapping)

    @staticmethod
    def _scoped(query, scope: Optional[int]):
        return query if scope is None else query.where(files_table.c.tenant_id == scope)

    def get(self, scope: Optional[int], file_id: str) -> FileRecord:
        """The file ``file_id`` of tenant ``scope`` (None: any tenant); 404 otherwise."""
        with self.engine.connect() as conn:
            row = conn.execute(self._scoped(sa.select(files_table).where(files_table.c.id == file_id), scope)).first()
        if row is None:
            raise file_not_found(file_id)
        return self._record(row)

    def list(self, scope: Optional[int], *, purpose: Optional[str] = None, after: Optional[str] = None, limit: int = 10000,
             order: str = "desc") -> tuple[list[FileRecord], bool]:
        """One page of files, newest first (``order="desc"``) as OpenAI lists them, and whether more follow."""
        c = files_table.c
        query = self._scoped(sa.select(files_table), scope)
        if purpose is not None:
            query = query.where(c.purpose == purpose)
        with self.engine.connect() as conn:
            if after is not None:
                mark = conn.execute(self._scoped(sa.select(c.created_at, c.id).where(c.id == after), scope)).first()
                if mark is None:
                    raise OpenAIError(400, f"`after` ({after!r}) is not the id of one of your files.", "invalid_request_error", "after",
                                      "invalid_cursor")
                key = sa.tuple_(c.created_at, c.id)
                query = query.where(key < sa.tuple_(*mark) if order == "desc" else key > sa.tuple_(*mark))
            direction = sa.desc if order == "desc" else sa.asc
            rows = conn.execute(query.order_by(direction(c.created_at), direction(c.id)).limit(limit + 1)).all()
        return [self._record(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, scope: Optional[int], file_id: str) -> FileRecord:
        """Delete the row, then the content (a content file left by a crash in between names no row and is never served)."""
        record = self.get(scope, file_id)
        with self.engine.begin() as conn:
            gone = conn.execute(files_table.delete().where(files_table.c.id == record.id)).rowcount
        if not gone:  # deleted a moment ago through another replica
            raise file_not_found(file_id)
        self.path(record).unlink(missing_ok=True)
        return record
