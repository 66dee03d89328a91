"""``/v1/files``: OpenAI's files API for a tenant's training files, behind the server's API keys.

Routes (OpenAI's shapes: the ``openai`` package's ``FileObject`` and ``FileDeleted``)::

    POST   /v1/files                     multipart: file=<JSON lines>, purpose=fine-tune
    GET    /v1/files                     ?purpose= &limit= &order= &after=  (the caller's files)
    GET    /v1/files/{file_id}
    GET    /v1/files/{file_id}/content
    DELETE /v1/files/{file_id}

A tenant's key sees only its tenant's files (another tenant's id is the same 404 as a missing
one); the admin key sees, reads and deletes every tenant's files but uploads none (a file
belongs to one tenant).

An upload is streamed, never held in memory: the route reads the multipart body itself
(python-multipart's push parser) instead of letting the server's ``BodyLimit`` buffer it, bounds
it by ``files.max_file_bytes`` (413 above), checks the file line by line as it arrives
(:mod:`.validation`) and writes it into the tenant's folder under a server-made name
(:mod:`.files`). A file with bad lines is refused with 400 listing up to 20 ``line N: reason``
entries; one beyond the tenant's quotas with 429 (``x-should-retry: false``). Either way nothing
stays on disk.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from openai.types import FileDeleted, FileObject
from pydantic import BaseModel
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from lorafleet.ftapi.files import FileStore, Upload, file_not_found
from lorafleet.ftapi.validation import LineChecker
from lorafleet.serve.errors import OpenAIError, bad_request
from lorafleet.serve.tenancy import forbidden, unauthorized

UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # the body beyond the file itself: boundaries, part headers, `purpose`
MAX_PARTS, MAX_FIELD_BYTES = 8, 1024
FIELDS = ("purpose",)  # the form's fields besides `file`

router = APIRouter()


class FileList(BaseModel):
    """``GET /v1/files``: one page of files (the openai client's ``SyncCursorPage[FileObject]``)."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSON lines, one training example per line: chat `messages` or "
                 "`prompt` and `completion` (docs/finetuning-api.md)."},
        "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}}


def mount(api) -> None:
    """Add the files and fine-tuning routes to the server's FastAPI app; its ``BodyLimit`` leaves the upload's body to the route."""
    from lorafleet.ftapi.job_routes import router as jobs_router

    api.include_router(router)
    api.include_router(jobs_router)
    api.state.streamed_bodies = {UPLOAD_PATH}


def attach(state, cfg, tenancy) -> None:
    """What the routes of one replica work with (on the app's ``state``): its files and its fine-tuning jobs."""
    from lorafleet.ftapi.job_routes import JobsAPI

    state.files = FilesAPI(cfg, tenancy)
    state.jobs = JobsAPI(cfg, tenancy, state.files)


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"The file is larger than this server's limit of {limit} bytes per file (files.max_file_bytes).",
                       "invalid_request_error", "file", "file_too_large")


class FilesAPI:
    """What the routes do, per replica: who sees which files, and the upload path."""

    def __init__(self, cfg, tenancy):
        self.tenancy, self.settings = tenancy, cfg.files
        self.store = FileStore(tenancy.registry.engine, cfg.state_path() / "files", cfg.files)

    async def scope(self, request: Request) -> Optional[int]:
        """The tenant id whose files the caller sees; None (every tenant's) for the admin key."""
        authorization = request.headers.get("authorization")
        if self.tenancy.is_admin(authorization):
            return None
        caller = await self.tenancy.caller(authorization)
        if caller.tenant is None:
            raise unauthorized("Files belong to a tenant: send `Authorization: Bearer <key>` with a tenant's API key.")
        return caller.tenant.id

    async def upload(self, request: Request) -> dict:
        if self.tenancy.is_admin(request.headers.get("authorization")):
            raise forbidden("A file belongs to one tenant: upload it with that tenant's API key.", "admin_key_not_allowed")
        tenant_id = await self.scope(request)
        limit = self.settings.max_file_bytes + MULTIPART_OVERHEAD
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(self.settings.max_file_bytes)
        kind, options = parse_options_header(request.headers.get("content-type"))
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise bad_request("POST /v1/files takes a multipart/form-data body with the fields `file` and `purpose` "
                              "(as the openai client's files.create sends it).", None, "invalid_content_type")
        await asyncio.to_thread(self.store.check_room, tenant_id, 0, 1)  # a tenant at its file count is refused before any byte is read
        form = _Form(self.store, tenant_id, self.settings)
        try:
            try:
                parser = MultipartParser(options[b"boundary"], form.callbacks(), max_header_count=8, max_header_size=4096)
            except FormParserError as exc:
                raise bad_request(f"The multipart body cannot be read: {exc}.", None, "invalid_multipart") from None
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large(self.settings.max_file_bytes)
                try:
                    await asyncio.to_thread(parser.write, chunk)  # JSON checks off the event loop: generation keeps its latency
                except FormParserError as exc:
                    raise bad_request(f"The multipart body cannot be read: {exc}.", None, "invalid_multipart") from None
            upload, filename, purpose = form.result()
            record = await asyncio.to_thread(self.store.commit, upload, filename, purpose)
        except BaseException:
            form.discard()
            raise
        return record.openai()

    async def list(self, request: Request, purpose: Optional[str], limit: int, order: str, after: Optional[str]) -> dict:
        scope = await self.scope(request)
        records, more = await asyncio.to_thread(self.store.list, scope, purpose=purpose, after=after, limit=limit, order=order)
        return {"object": "list", "data": [r.openai() for r in records], "first_id": records[0].id if records else None,
                "last_id": records[-1].id if records else None, "has_more": more}

    async def get(self, request: Request, file_id: str) -> dict:
        return (await asyncio.to_thread(self.store.get, await self.scope(request), file_id)).openai()

    async def content(self, request: Request, file_id: str) -> StreamingResponse:
        record = await asyncio.to_thread(self.store.get, await self.scope(request), file_id)
        try:
            fh = open(self.store.path(record), "rb")  # opened here: a delete racing the download cannot fail it half-way
        except FileNotFoundError:
            raise file_not_found(file_id) from None

        def chunks():
            with fh:
                while block := fh.read(2**20):
                    yield block

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={"content-length": str(record.bytes)})

    async def delete(self, request: Request, file_id: str) -> dict:
        record = await asyncio.to_thread(self.store.delete, await self.scope(request), file_id)
        return {"id": record.id, "object": "file", "deleted": True}


class _Form:
    """python-multipart's callbacks for one upload: the ``file`` part checked line by line and written into the
    tenant's folder (until a line is bad: then only checked, to list the problems), the small fields kept."""

    def __init__(self, store: FileStore, tenant_id: int, settings):
        self.store, self.tenant_id, self.max_file_bytes = store, tenant_id, settings.max_file_bytes
        self.checker = LineChecker(settings.max_line_bytes)
        self.upload: Optional[Upload] = None
        self.filename: Optional[str] = None
        self.file_bytes, self.parts, self.ended = 0, 0, False
        self.fields: dict[str, bytearray] = {}
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value, self._current = b"", b"", None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request(f"The form has more than {MAX_PARTS} parts; POST /v1/files takes `file` and `purpose`.", None, "invalid_multipart")
        self._headers, self._current = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("latin-1")
        if name == "file":
            if self.filename is not None:
                raise bad_request("The form has more than one `file` part; upload one file per request.", "file", "invalid_multipart")
            self.filename = _filename(options.get(b"filename"))
            self.upload = self.store.begin(self.tenant_id)
        elif name in FIELDS:
            if name in self.fields:
                raise bad_request(f"The form gives `{name}` twice.", name, "invalid_multipart")
            self.fields[name] = bytearray()
        else:
            raise bad_request(f"Unknown form field {name[:64]!r}: POST /v1/files takes `file` and `purpose`.", name[:64] or None,
                              "unknown_parameter")
        self._current = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current != "file":
            field = self.fields[self._current]
            field += chunk
            if len(field) > MAX_FIELD_BYTES:
                raise bad_request(f"`{self._current}` is longer than {MAX_FIELD_BYTES} bytes.", self._current)
            return
        self.file_bytes += len(chunk)
        if self.file_bytes > self.max_file_bytes:
            raise too_large(self.max_file_bytes)
        self.checker.feed(chunk)
        if self.upload is not None:
            if self.checker.ok:
                self.upload.write(chunk)
            else:  # the file will be refused: stop storing it, keep reading it for the list of problems
                self.upload.discard()
                self.upload = None

    def _part_end(self) -> None:
        if self._current == "file":
            self.checker.finish()
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def result(self) -> tuple[Upload, str, str]:
        """(upload, filename, purpose) of a complete, valid form; 400 naming what is wrong otherwise."""
        if not self.ended:
            raise bad_request("The multipart body ended before its closing boundary.", None, "invalid_multipart")
        if self.filename is None:
            raise bad_request("The form has no `file` part (the JSON-lines training file).", "file", "missing_file")
        purpose = bytes(self.fields.get("purpose", b"")).decode("utf-8", "replace")
        if purpose != "fine-tune":
            raise bad_request(f"`purpose` must be `fine-tune` (got {purpose[:64]!r}): this server stores fine-tuning files only.", "purpose",
                              "invalid_purpose")
        if not self.checker.ok:
            raise bad_request(self.checker.summary(), "file", "invalid_file")
        return self.upload, self.filename, purpose

    def discard(self) -> None:
        if self.upload is not None:
            self.upload.discard()
            self.upload = None


def _filename(raw: Optional[bytes]) -> str:
    """The name the client gave, shown back in listings and never used on disk; a path or a control character is refused
    (the openai client sends a file's base name)."""
    if raw is None:
        raise bad_request("The `file` part has no filename: send it as a file (files.create(file=open(path, 'rb'), ...)).", "file",
                          "invalid_filename")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The filename is not UTF-8 text.", "file", "invalid_filename") from None
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise bad_request(f"The filename {name[:80]!r} holds control characters (NUL, newline...).", "file", "invalid_filename")
    if "/" in name or "\\" in name or name in ("", ".", "..") or len(name.encode()) > 255:
        raise bad_request(f"The filename {name[:80]!r} is not a plain file name: no folders (`/`, `\\`), at most 255 bytes.", "file",
                          "invalid_filename")
    return name


@router.post(UPLOAD_PATH, response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def create_file(request: Request):
    """Upload a training file (JSON lines, checked line by line) for fine-tuning."""
    return await request.app.state.files.upload(request)


@router.get(UPLOAD_PATH, response_model=FileList)
async def list_files(request: Request, purpose: Optional[str] = None, limit: int = Query(10000, ge=1, le=10000),
                     order: Literal["asc", "desc"] = "desc", after: Optional[str] = None):
    """The caller's files (the admin's: every tenant's), newest first; `after` (a file id) pages on."""
    return await request.app.state.files.list(request, purpose, limit, order, after)


@router.get(UPLOAD_PATH + "/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, request: Request):
    return await request.app.state.files.get(request, file_id)


@router.get(UPLOAD_PATH + "/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def file_content(file_id: str, request: Request):
    """The file's bytes as uploaded."""
    return await request.app.state.files.content(request, file_id)


@router.delete(UPLOAD_PATH + "/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, request: Request):
    return await request.app.state.files.delete(request, file_id)
