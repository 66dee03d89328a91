"""The files store and the line checks without a server: what is refused and why, what stays on disk,
and tenants' quotas under concurrent uploads (on the real registry database, SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import threading

import pytest

from lorafleet.data import read_rows
from lorafleet.ftapi.config import FileSettings
from lorafleet.ftapi.files import FileStore
from lorafleet.ftapi.validation import MAX_PROBLEMS, LineChecker
from lorafleet.serve.errors import OpenAIError
from lorafleet.serve.registry import Registry

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "card lost"},
                     {"role": "assistant", "content": "lost_or_stolen_card"}]}
PAIR = {"prompt": "card lost", "completion": "lost_or_stolen_card"}


def check(data: bytes, step: int = 0, max_line_bytes: int = 4096) -> LineChecker:
    checker = LineChecker(max_line_bytes)
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        checker.feed(data[i:i + step])
    checker.finish()
    return checker


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def test_good_files_pass_in_either_format_and_training_reads_every_example(tmp_path):
    for rows in ([CHAT] * 3, [PAIR] * 3):
        data = lines(*rows) + b"\n"  # a trailing blank line, as editors leave
        c = check(data)
        assert c.ok and c.examples == 3, c.problems
        (tmp_path / "f.jsonl").write_bytes(data)
        assert read_rows(tmp_path / "f.jsonl") == rows


@pytest.mark.parametrize("step", [1, 5, 0])
def test_bad_lines_are_numbered_as_the_training_loader_numbers_them_whatever_the_chunking(step):
    data = lines(CHAT, b"", b"{oops", {"messages": [{"role": "robot", "content": "hi"}]}, {"messages": [{"role": "user", "content": "hi"}]},
                 b"\xff\xfe", [1, 2], PAIR, b"x" * 5000, {"text": "no format"}, {"prompt": "a", "completion": "b", "messages": "x"},
                 b'{"prompt": "a",\r"completion": "b"}')
    c = check(data, step)
    assert [p.split(":")[0] for p in c.problems] == [f"line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    text = "\n".join(c.problems)
    for reason in ("not valid JSON", "needs a role", "assistant turn", "not UTF-8", "a JSON list", "one format per file",
                   "longer than 4096 bytes", "expected `messages`", "must be a list", "carriage return"):
        assert reason in text, (reason, text)
    assert c.examples == 1 and c.lines == 12


def test_empty_files_and_long_lists_of_problems():
    for data in (b"", b"\n\n  \n"):
        c = check(data)
        assert not c.ok and c.problems == [c.problems[0]] and "no training examples" in c.problems[0]
    c = check(b"{oops\n" * 50)
    assert c.bad_lines == 50 and len(c.problems) == MAX_PROBLEMS
    assert c.summary().splitlines()[-1] == "(and 30 more lines with problems)"


def test_uploads_commit_into_the_tenants_folder_and_refusals_leave_nothing(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/registry.db")
    acme, _ = reg.create_tenant("acme")
    globex, _ = reg.create_tenant("globex")
    store = FileStore(reg.engine, tmp_path / "files", FileSettings(max_files=2, max_total_bytes=4096))
    upload = store.begin(acme.id)
    upload.write(lines(PAIR))
    record = store.commit(upload, "pairs.jsonl", "fine-tune")
    assert store.path(record) == tmp_path / "files" / str(acme.id) / f"{record.id}.jsonl"
    assert store.path(record).read_bytes() == lines(PAIR) and record.bytes == len(lines(PAIR))
    assert store.get(acme.id, record.id) == record == store.get(None, record.id)
    with pytest.raises(OpenAIError) as err:
        store.get(globex.id, record.id)
    assert err.value.status == 404
    # over the byte quota: 429, and neither the part file nor a row stays
    big = store.begin(acme.id)
    big.write(b"x" * 5000)
    with pytest.raises(OpenAIError) as err:
        store.commit(big, "big.jsonl", "fine-tune")
    assert err.value.status == 429 and err.value.headers == {"x-should-retry": "false"}
    assert sorted(p.name for p in (tmp_path / "files" / str(acme.id)).iterdir()) == [f"{record.id}.jsonl"]
    assert store.usage(acme.id) == (1, record.bytes)
    assert [r.id for r in store.list(None)[0]] == [record.id] and store.list(globex.id) == ([], False)
    store.delete(acme.id, record.id)
    assert not store.path(record).exists() and store.usage(acme.id) == (0, 0)
    reg.close()


def test_listing_pages_newest_first_with_after(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/registry.db")
    acme, _ = reg.create_tenant("acme")
    store = FileStore(reg.engine, tmp_path / "files", FileSettings())
    ids = []
    for i in range(5):
        upload = store.begin(acme.id)
        upload.write(lines(PAIR))
        ids.append(store.commit(upload, f"{i}.jsonl", "fine-tune").id)
    seen, after = [], None
    while True:
        page, more = store.list(acme.id, after=after, limit=2)
        seen += [r.id for r in page]
        if not more:
            break
        after = page[-1].id
    assert len(seen) == 5 and set(seen) == set(ids)
    assert [r.id for r in store.list(acme.id, order="asc")[0]] == seen[::-1]
    reg.close()


def _race(url: str, tmp_path) -> None:
    """Eight uploads of one tenant at once against a quota of three files: exactly three are stored."""
    reg = Registry(url)
    tenant, _ = reg.create_tenant("acme")
    store = FileStore(reg.engine, tmp_path / "files", FileSettings(max_files=3))
    uploads = []
    for _ in range(8):
        upload = store.begin(tenant.id)
        upload.write(lines(PAIR))
        uploads.append(upload)
    results, barrier = [], threading.Barrier(len(uploads))

    def commit(upload):
        barrier.wait()
        try:
            results.append(store.commit(upload, "f.jsonl", "fine-tune").id)
        except OpenAIError as exc:
            results.append(exc.status)

    threads = [threading.Thread(target=commit, args=(u,)) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)).count("429") == 5, results
    assert store.usage(tenant.id)[0] == 3 and len(list((tmp_path / "files" / str(tenant.id)).iterdir())) == 3
    reg.close()


def test_concurrent_uploads_never_pass_the_file_quota_sqlite(tmp_path):
    _race(f"sqlite:///{tmp_path}/registry.db", tmp_path)


@pytest.mark.postgres
def test_concurrent_uploads_never_pass_the_file_quota_postgresql(postgres_db, tmp_path):
    _race(postgres_db, tmp_path)
