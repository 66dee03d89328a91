"""OpenAI's files API (``/v1/files``) on the session's real app, with the official ``openai`` client.

Tenants ``filer-a``, ``filer-b`` and ``filer-q`` (quotas) are created through the admin API.
The app's ``files`` settings (conftest.served) allow 256 KiB per file (above the 64 KiB
``limits.max_body_bytes``, so an upload must pass the server's body limit by its own), lines of
16 KiB, and 4 files / 512 KiB per tenant. Tests run in file order and build on each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import FileDeleted, FileObject

from serve_helpers import ADMIN_KEY
from testutils import record_scenario

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS: dict[str, str] = {}
TENANT_IDS: dict[str, int] = {}


def example(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "Classify the banking query."}, {"role": "user", "content": f"my card number {i} was stolen"},
                         {"role": "assistant", "content": "lost_or_stolen_card"}]}


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


TRAIN = jsonl(example(i) for i in range(800))  # ~150 KB: more than limits.max_body_bytes
assert 65536 < len(TRAIN) < 256 * 1024


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        for name in ("filer-a", "filer-b", "filer-q"):
            r = client.post("/admin/tenants", headers=ADMIN, json={"name": name})
            assert r.status_code == 201, r.text
            KEYS[name] = r.json()["api_key"]["key"]
        yield client


def client_for(served, key: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, **kwargs)


def files_root(served) -> Path:
    return Path(served.cfg.tenancy.state_dir) / "files"


def tenant_dir(served, name: str) -> Path:
    if name not in TENANT_IDS:
        import sqlalchemy as sa

        engine = sa.create_engine(served.cfg.registry_url())
        with engine.connect() as conn:
            TENANT_IDS[name] = conn.execute(sa.text("SELECT id FROM lorafleet_tenants WHERE name = :n"), {"n": name}).scalar_one()
        engine.dispose()
    return files_root(served) / str(TENANT_IDS[name])


def on_disk(served) -> list[str]:
    """Every file under the files root, relative to it."""
    root = files_root(served)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def error(exc_info, status: int, code: str) -> dict:
    exc = exc_info.value
    assert exc.status_code == status, (exc.status_code, exc.response.text)
    err = exc.response.json()["error"]
    assert err["code"] == code and err["message"] and "Traceback" not in err["message"], err
    return err


def test_a_tenant_uploads_lists_retrieves_reads_and_deletes_its_file(http, served):
    a = client_for(served, KEYS["filer-a"])
    created = a.files.create(file=("train.jsonl", TRAIN), purpose="fine-tune")
    assert isinstance(created, FileObject)
    assert (created.object, created.purpose, created.filename, created.bytes, created.status) == ("file", "fine-tune", "train.jsonl", len(TRAIN),
                                                                                                   "processed")
    assert created.id.startswith("file-") and len(created.id) == 29
    # stored under the tenant's folder by its server-made id, byte for byte
    assert (tenant_dir(served, "filer-a") / f"{created.id}.jsonl").read_bytes() == TRAIN
    assert on_disk(served) == [f"{TENANT_IDS['filer-a']}/{created.id}.jsonl"]
    second = a.files.create(file=("small.jsonl", jsonl([example(1)])), purpose="fine-tune")
    listed = a.files.list()
    assert [f.id for f in listed.data] == [second.id, created.id] and all(isinstance(f, FileObject) for f in listed.data)
    assert [f.id for f in a.files.list(limit=1)] == [second.id, created.id]  # the client pages through with `after`
    assert a.files.retrieve(created.id) == created
    assert a.files.content(created.id).read() == TRAIN  # both replicas serve it: one registry, one state dir
    deleted = a.files.delete(second.id)
    assert isinstance(deleted, FileDeleted) and (deleted.id, deleted.deleted) == (second.id, True)
    with pytest.raises(openai.NotFoundError) as exc:
        a.files.retrieve(second.id)
    error(exc, 404, "file_not_found")
    assert not (tenant_dir(served, "filer-a") / f"{second.id}.jsonl").exists()
    assert [f.id for f in a.files.list()] == [created.id]


def test_another_tenant_gets_404_as_for_a_missing_id_and_the_admin_sees_all(http, served):
    a, b = client_for(served, KEYS["filer-a"]), client_for(served, KEYS["filer-b"])
    mine = a.files.list().data[0]
    b_file = b.files.create(file=("b.jsonl", jsonl([{"prompt": "card stolen", "completion": "lost_or_stolen_card"}])), purpose="fine-tune")
    assert [f.id for f in b.files.list()] == [b_file.id]
    missing = "file-" + "0" * 24
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        answers = []
        for file_id in (mine.id, missing):
            with pytest.raises(openai.NotFoundError) as exc:
                call(file_id)
            answers.append(error(exc, 404, "file_not_found")["message"].replace(file_id, "<id>"))
        assert answers[0] == answers[1]
    assert a.files.retrieve(mine.id) == mine  # still there
    admin = client_for(served, ADMIN_KEY)
    assert {f.id for f in admin.files.list()} >= {mine.id, b_file.id}
    assert admin.files.retrieve(b_file.id) == b_file and admin.files.content(mine.id).read() == TRAIN
    with pytest.raises(openai.PermissionDeniedError) as exc:
        admin.files.create(file=("x.jsonl", jsonl([example(0)])), purpose="fine-tune")
    error(exc, 403, "admin_key_not_allowed")
    # the fixture allows anonymous calls to models; files always need a key
    assert http.get("/v1/files").status_code == 401
    assert http.get(f"/v1/files/{mine.id}/content").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client_for(served, "lfk_000000000000_" + "0" * 64).files.list()


def test_quotas_413_per_file_and_429_per_tenant_without_retries(http, served):
    """413 for one file over files.max_file_bytes (the request is too large); 429 when the tenant's files
    would pass files.max_total_bytes or files.max_files (its quota, as requests per minute are), sent with
    ``x-should-retry: false`` since waiting frees nothing: the openai client does not re-send the upload."""
    sent = []
    q = client_for(served, KEYS["filer-q"], max_retries=2, http_client=httpx.Client(event_hooks={"request": [sent.append]}, timeout=120))
    before = on_disk(served)
    with pytest.raises(openai.APIStatusError) as exc:
        q.files.create(file=("big.jsonl", jsonl(example(i) for i in range(1500))), purpose="fine-tune")
    error(exc, 413, "file_too_large")
    kept = [q.files.create(file=(f"{i}.jsonl", TRAIN), purpose="fine-tune") for i in range(3)]  # 3 x ~150 KB of 512 KiB
    sent.clear()
    with pytest.raises(openai.RateLimitError) as exc:
        q.files.create(file=("3.jsonl", TRAIN), purpose="fine-tune")
    assert "files.max_total_bytes" in error(exc, 429, "file_quota_exceeded")["message"]
    assert exc.value.response.headers["x-should-retry"] == "false" and len(sent) == 1  # refused once, not re-sent
    kept.append(q.files.create(file=("small.jsonl", jsonl([example(0)])), purpose="fine-tune"))  # fits: 4 files
    with pytest.raises(openai.RateLimitError) as exc:
        q.files.create(file=("five.jsonl", jsonl([example(0)])), purpose="fine-tune")
    assert "files.max_files" in error(exc, 429, "file_quota_exceeded")["message"]
    folder = tenant_dir(served, "filer-q").relative_to(files_root(served))
    assert sorted(on_disk(served)) == sorted(before + [f"{folder}/{f.id}.jsonl" for f in kept])
    q.files.delete(kept[0].id)
    assert q.files.create(file=("again.jsonl", jsonl([example(0)])), purpose="fine-tune").bytes > 0  # room again


@pytest.mark.parametrize("name, data, expected", [
    ("bad-json", jsonl([example(0)]) + b'{"messages": [oops\n' + jsonl([example(2)]) + b"{\n", {2: "not valid JSON", 4: "not valid JSON"}),
    ("wrong-roles", jsonl([example(0), {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}]),
     {2: "needs a role"}),
    ("no-assistant", b"\n" + jsonl([{"messages": [{"role": "user", "content": "hello"}]}, example(1),
                                    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}]),
     {2: "assistant turn", 4: "assistant turn"}),
    ("empty", b"", {1: "no training examples"}),
    ("mixed", jsonl([example(0), {"prompt": "p", "completion": "c"}, {"text": "### Human: a ### Assistant: b"}]),
     {2: "one format per file", 3: "expected `messages`"}),
])
def test_malformed_files_are_refused_with_their_line_numbers(http, served, name, data, expected):
    b = client_for(served, KEYS["filer-b"])
    before = on_disk(served)
    with pytest.raises(openai.BadRequestError) as exc:
        b.files.create(file=(f"{name}.jsonl", data), purpose="fine-tune")
    err = error(exc, 400, "invalid_file")
    problems = [line for line in err["message"].splitlines() if line.startswith("line ")]
    assert [int(p.split(":")[0].split()[1]) for p in problems] == list(expected), err["message"]
    for p, reason in zip(problems, expected.values()):
        assert reason in p, (p, reason)
    assert on_disk(served) == before


def multipart(filename: bytes, content: bytes, purpose: bytes = b"fine-tune", boundary: bytes = b"lorafleet-test-boundary",
              extra: bytes = b"") -> tuple[dict, bytes]:
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose + b"\r\n"
            + b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename + b"\"\r\n"
            + b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n" + extra + b"--" + boundary + b"--\r\n")
    return {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}, body


def test_hostile_uploads_get_4xx_and_write_nothing_outside_the_tenants_folder(http, served):
    auth = {"Authorization": f"Bearer {KEYS['filer-b']}"}
    good = jsonl([example(0)])
    before = on_disk(served)

    def post(headers: dict, body) -> httpx.Response:
        return http.post("/v1/files", headers={**auth, **headers}, content=body)

    def chunked(data: bytes):  # no Content-Length: the limit must hold while streaming
        for i in range(0, len(data), 32768):
            yield data[i:i + 32768]

    cases = {
        "oversized (Content-Length)": post(*multipart(b"big.jsonl", b"x" * (400 * 1024))),
        "oversized (chunked, no length)": post(multipart(b"big.jsonl", b"x" * (400 * 1024))[0], chunked(multipart(b"big.jsonl", b"x" * (400 * 1024))[1])),
        "path filename ../../etc/passwd": post(*multipart(b"../../etc/passwd", good)),
        "absolute filename /etc/passwd": post(*multipart(b"/etc/passwd", good)),
        "windows path filename": post(*multipart(b"..\\..\\evil.jsonl", good)),
        "NUL in the filename": post(*multipart(b"a\x00b.jsonl", good)),
        "newline in the filename": post(*multipart(b"a\nb.jsonl", good)),
        "non-UTF-8 filename": post(*multipart(b"\xff\xfe.jsonl", good)),
        "huge single line": post(*multipart(b"line.jsonl", b'{"prompt": "' + b"a" * (100 * 1024) + b'", "completion": "b"}\n')),
        "non-UTF-8 content": post(*multipart(b"latin1.jsonl", '{"prompt": "café", "completion": "b"}\n'.encode("latin-1"))),
        "wrong purpose": post(*multipart(b"a.jsonl", good, b"batch")),
        "two file parts": post(*multipart(b"a.jsonl", good, extra=b"--lorafleet-test-boundary\r\nContent-Disposition: form-data; "
                                                                  b"name=\"file\"; filename=\"b.jsonl\"\r\n\r\n" + good + b"\r\n")),
        "truncated body": post(multipart(b"a.jsonl", good)[0], multipart(b"a.jsonl", good)[1][:-40]),
        "JSON instead of multipart": http.post("/v1/files", headers=auth, json={"file": "x", "purpose": "fine-tune"}),
        "unknown form field": post(*multipart(b"a.jsonl", good, extra=b"--lorafleet-test-boundary\r\nContent-Disposition: form-data; "
                                                                          b"name=\"surprise\"\r\n\r\n1\r\n")),
    }
    statuses = {case: r.status_code for case, r in cases.items()}
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    for case, r in cases.items():
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, (case, r.text)
    assert statuses["oversized (Content-Length)"] == statuses["oversized (chunked, no length)"] == 413
    assert cases["huge single line"].json()["error"]["message"].count("line 1: longer than 16384 bytes") == 1
    # nothing was stored, no partial file stays, and nothing was written beside the state dir
    assert on_disk(served) == before
    state = Path(served.cfg.tenancy.state_dir)
    assert not list(state.parent.rglob("passwd")) and not list(state.parent.rglob("evil.jsonl"))
    assert {p.name for p in state.iterdir()} <= {"files", "registry.db", "registry.db-wal", "registry.db-shm"}
    # a plain name is fine and is shown back as given
    ok = post(*multipart("résumé (v2).jsonl".encode(), good))
    assert ok.status_code == 200 and ok.json()["filename"] == "résumé (v2).jsonl", ok.text
    record_scenario("serving", "hostile uploads to /v1/files", bad_inputs=", ".join(cases), lost="nothing",
                    outcome=f"{len(cases)} x 4xx, 0 x 5xx; nothing stored outside the tenant's folder", statuses=statuses)


def test_operators_list_show_and_delete_files_with_the_cli(http, served, tmp_path, capsys):
    import yaml

    from lorafleet.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(served.cfg.model_dump(mode="json")))
    a = client_for(served, KEYS["filer-a"])
    mine = a.files.list().data[0]
    assert main(["files", "list", "--config", str(config), "--json"]) == 0
    listed = {c["id"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed[mine.id]["tenant"] == "filer-a" and {c["tenant"] for c in listed.values()} >= {"filer-a", "filer-b", "filer-q"}
    assert main(["files", "list", "--config", str(config), "--tenant", "filer-a", "--json"]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == [mine.id]
    assert main(["files", "list", "--config", str(config), "--tenant", "filer-a"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["file", "tenant", "bytes", "created", "filename"]
    assert row.split()[:3] == [mine.id, "filer-a", str(len(TRAIN))] and row.endswith(mine.filename)
    with pytest.raises(SystemExit, match="no tenant named 'nobody'"):
        main(["files", "list", "--config", str(config), "--tenant", "nobody"])
    assert main(["files", "show", mine.id, "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["bytes"] == len(TRAIN) and Path(shown["path"]).read_bytes() == TRAIN
    assert main(["files", "delete", mine.id, "--config", str(config)]) == 0
    assert "deleted" in capsys.readouterr().out and not Path(shown["path"]).exists()
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(mine.id)
    assert main(["files", "show", mine.id, "--config", str(config)]) == 1
