"""Loading task data: real banking77 and dialogsum files, column renaming, bad rows, the
formats read_rows accepts, and (with a stand-in loader) the hub code path."""

from __future__ import annotations

import collections
import csv
import json
import logging
from pathlib import Path

import pytest

from lorafleet.config import DataConfig
from lorafleet.data import get_task, load_eval_examples, load_task_data, read_rows
from data_helpers import BANKING_CSV, DIALOGSUM

needs_banking = pytest.mark.skipif(not BANKING_CSV.is_file(), reason=f"banking77 data not found at {BANKING_CSV}")
needs_dialogsum = pytest.mark.skipif(not DIALOGSUM.is_file(), reason=f"dialogsum data not found at {DIALOGSUM}")


def _write_csv(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@needs_banking
def test_banking77_csv_splits_80_20_deterministically():
    cfg = DataConfig(task="banking77", path=str(BANKING_CSV))
    data = load_task_data(cfg)
    assert (len(data.train), len(data.validation)) == (8002, 2001)
    assert data.stats["rows_read"] == data.stats["rows_used"] == 10003
    assert not any(k.startswith("skipped_") for k in data.stats)
    categories = json.loads((BANKING_CSV.parent / "categories.json").read_text())
    assert data.labels == sorted(categories)
    ex = data.train[0]
    assert ex.prompt == f"Query: {ex.input}\nIntent:" and ex.completion == " " + ex.reference.replace("_", " ")
    assert ex.reference in categories
    # Train and validation partition the file's rows: each row lands in exactly one of them.
    with BANKING_CSV.open(encoding="utf-8") as f:
        file_rows = collections.Counter((r["text"].strip(), r["category"]) for r in csv.DictReader(f))
    split_rows = collections.Counter((e.input, e.reference) for e in data.train + data.validation)
    assert split_rows == file_rows
    train_q, val_q = {e.input for e in data.train}, {e.input for e in data.validation}
    # Disjoint, except that the file itself holds 4 queries twice (once with stray newlines).
    repeated = {q for (q, _), n in file_rows.items() if n > 1}
    assert len(repeated) == 4 and train_q & val_q <= repeated
    # Same file + config: same split and fingerprint; another seed: another split.
    again = load_task_data(cfg)
    assert again.train == data.train and again.validation == data.validation
    assert again.fingerprint == data.fingerprint and len(data.fingerprint) == 64
    other = load_task_data(cfg.model_copy(update={"seed": 7}))
    assert other.fingerprint != data.fingerprint and {e.input for e in other.validation} != val_q
    # Every intent is represented in training.
    assert set(collections.Counter(e.reference for e in data.train)) == set(categories)


@needs_banking
def test_max_train_samples_caps_train_after_the_split():
    cfg = DataConfig(task="banking77", path=str(BANKING_CSV), max_train_samples=500)
    data = load_task_data(cfg)
    assert len(data.train) == 500 and len(data.validation) == 2001
    assert data.stats["dropped_max_train_samples"] == 7502
    assert len({e.reference for e in data.train}) > 50  # a random sample, not the first rows of a sorted file
    full = load_task_data(DataConfig(task="banking77", path=str(BANKING_CSV)))
    assert data.validation == full.validation and {e.input for e in data.train} <= {e.input for e in full.train}


def test_column_renaming_and_validation_file(tmp_path):
    rows = [{"utterance": f"query number {i}", "intent": "claim" if i % 3 else "not_claim"} for i in range(30)]
    train = _write_csv(tmp_path / "train.csv", rows)
    val = _write_jsonl(tmp_path / "val.jsonl", rows[:4])
    cfg = DataConfig(task="classification", path=train, validation_path=val,
                     columns={"text": "utterance", "label": "intent"})
    data = load_task_data(cfg)
    assert len(data.train) == 30 and len(data.validation) == 4
    assert data.labels == ["claim", "not_claim"]
    assert data.validation[1].prompt == "Text: query number 1\nLabel:" and data.validation[1].completion == " claim"


def test_missing_column_error_says_what_and_how(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", [{"sentence": "hello", "intent": "greet"}])
    with pytest.raises(ValueError) as err:
        load_task_data(DataConfig(task="banking77", path=path))
    message = str(err.value)
    assert "'text'" in message and "'label'" in message and "'category'" in message  # fields + fallback looked for
    assert "['sentence', 'intent']" in message  # columns found
    assert "data.columns" in message
    with pytest.raises(ValueError, match="does not read"):
        load_task_data(DataConfig(task="banking77", path=path, columns={"txt": "sentence"}))


def test_bad_rows_are_skipped_counted_and_logged_or_raise(tmp_path, caplog):
    rows = [{"text": f"good row {i}", "label": "yes" if i % 2 else "no"} for i in range(20)]
    rows += [{"text": "   ", "label": "yes"}, {"text": "", "label": "no"}, {"text": "odd", "label": "maybe"},
             {"text": "no label", "label": ""}]
    path = _write_csv(tmp_path / "rows.csv", rows)
    cfg = DataConfig(task="classification", path=path, labels=["yes", "no"])
    with caplog.at_level(logging.WARNING, logger="lorafleet.data.loading"):
        data = load_task_data(cfg)
    assert data.stats["skipped_empty_field"] == 3 and data.stats["skipped_unknown_label"] == 1
    assert data.stats["rows_read"] == 24 and data.stats["rows_used"] == 20
    assert data.labels == ["no", "yes"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once per reason, with the count
    assert any("skipped 3 row(s) (empty_field)" in w for w in warnings)
    assert any("skipped 1 row(s) (unknown_label)" in w and "'maybe'" in w for w in warnings)
    with pytest.raises(ValueError, match=r"row 21 of .*field 'text' is empty.*on_bad_row"):
        load_task_data(cfg.model_copy(update={"on_bad_row": "error"}))
    with pytest.raises(ValueError, match="every one of its 24 row"):
        load_task_data(cfg.model_copy(update={"labels": ["neither"]}))


@needs_dialogsum
def test_dialogsum_jsonl_loads():
    data = load_task_data(DataConfig(task="dialogsum", path=str(DIALOGSUM)))
    assert (len(data.train), len(data.validation)) == (400, 100) and data.labels is None
    first = json.loads(DIALOGSUM.read_text(encoding="utf-8").splitlines()[0])
    ex = next(e for e in data.train + data.validation if e.input == first["dialogue"].strip())
    assert ex.prompt == f"Dialogue:\n{first['dialogue'].strip()}\nSummary:"
    assert ex.completion == " " + first["summary"].strip() and ex.reference == first["summary"].strip()
    evals = load_eval_examples("dialogsum", str(DIALOGSUM), limit=3)
    assert [e.input for e in evals] == [json.loads(l)["dialogue"].strip() for l in DIALOGSUM.read_text().splitlines()[:3]]


def test_commonsense_qa_jsonl_in_three_layouts(tmp_path):
    choices = {"label": ["A", "B", "C", "D", "E"], "text": ["bank", "library", "park", "zoo", "moon"]}
    rows = [{"id": str(i), "question": f"Where is thing {i}?", "choices": choices, "answerKey": "ABCDE"[i % 5]}
            for i in range(10)]
    rows.append({"id": "test", "question": "Unlabelled?", "choices": choices, "answerKey": ""})  # hub test split style
    data = load_task_data(DataConfig(task="commonsense_qa", path=_write_jsonl(tmp_path / "csqa.jsonl", rows)))
    assert data.stats["skipped_empty_field"] == 1 and data.labels is None
    ex = next(e for e in data.train + data.validation if e.input.startswith("Where is thing 3?"))
    assert ex.prompt == "Question: Where is thing 3?\nA. bank\nB. library\nC. park\nD. zoo\nE. moon\nAnswer:"
    assert ex.completion == " D" and ex.reference == "D"
    flat = [{"question": "Q?", "A": "x", "B": "y", "C": "z", "answer": "C"}]
    as_string = [{"question": "Q?", "choices": json.dumps(["x", "y", "z"]), "answer": "C"}]
    a = load_eval_examples("commonsense_qa", _write_csv(tmp_path / "flat.csv", flat))
    b = load_eval_examples("commonsense_qa", _write_csv(tmp_path / "str.csv", as_string), columns={"answer": "answer"})
    assert a == b and a[0].prompt == "Question: Q?\nA. x\nB. y\nC. z\nAnswer:" and a[0].completion == " C"


def test_chat_messages_with_template_and_guanaco_text(tmp_path, chat_tokenizer):
    convo = [{"role": "user", "content": f"Question {i}?"} for i in range(6)]
    rows = [{"messages": [m, {"role": "assistant", "content": f"Answer {i}."}]} for i, m in enumerate(convo)]
    rows.append({"messages": [{"role": "user", "content": "nobody answers"}]})
    cfg = DataConfig(task="chat", path=_write_jsonl(tmp_path / "chat.jsonl", rows), validation_fraction=0.5)
    data = load_task_data(cfg, tokenizer=chat_tokenizer)
    assert data.stats["skipped_no_assistant_turn"] == 1 and data.stats["rows_used"] == 6
    ex = sorted(data.train + data.validation, key=lambda e: e.input)[0]
    assert ex.prompt == "<s><|user|>\nQuestion 0?</s>\n<|assistant|>\n" and ex.completion == "Answer 0."
    guanaco = [{"text": f"### Human: Say {i}.### Assistant: {i}!"} for i in range(5)]
    data = load_task_data(DataConfig(task="chat", path=_write_jsonl(tmp_path / "g.jsonl", guanaco)))
    ex = sorted(data.train + data.validation, key=lambda e: e.input)[0]
    assert (ex.prompt, ex.completion, ex.input, ex.reference) == ("### Human: Say 0.### Assistant:", " 0!", "Say 0.", "0!")


def test_raw_text_from_txt_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\nthird line\nfourth line\nfifth line\n", encoding="utf-8")
    data = load_task_data(DataConfig(task="raw_text", path=str(path)))
    texts = sorted(e.completion for e in data.train + data.validation)
    assert texts == ["fifth line", "first line", "fourth line", "second line", "third line"]
    assert all(e.prompt == "" for e in data.train) and len(data.validation) == 1
    with pytest.raises(ValueError, match="data.labels .* classification tasks"):
        load_task_data(DataConfig(task="raw_text", path=str(path), labels=["x"]))


def test_read_rows_formats_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_csv(folder / "1.csv", rows)
    _write_jsonl(folder / "2.jsonl", rows)
    (folder / "3.json").write_text(json.dumps(rows))
    (folder / "4.json").write_text(json.dumps({"text": ["a", "b"], "label": ["x", "y"]}))
    pq.write_table(pa.Table.from_pylist(rows), folder / "5.parquet")
    (folder / "notes.md").write_text("ignored")
    assert read_rows(folder) == rows * 5
    assert read_rows(folder / "5.parquet") == rows
    with pytest.raises(FileNotFoundError, match="data.path"):
        read_rows(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown extension '.md'"):
        read_rows(folder / "notes.md")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 of .*broken.jsonl is not valid JSON"):
        read_rows(tmp_path / "broken.jsonl")
    # a JSON line ends at \n only: U+2028 / U+0085 inside a string (valid unescaped JSON) do not split it
    (tmp_path / "separators.jsonl").write_text('{"text": "a\u2028b\u0085c"}\r\n\n{"text": "d"}\n', encoding="utf-8")
    assert read_rows(tmp_path / "separators.jsonl") == [{"text": "a\u2028b\u0085c"}, {"text": "d"}]


def test_load_eval_examples_keeps_file_order_and_limit(tmp_path):
    rows = [{"text": f"t{i}", "category": "card_arrival"} for i in range(6)] + [{"text": "x", "category": "no_such_intent"}]
    path = _write_csv(tmp_path / "eval.csv", rows)
    examples = load_eval_examples(get_task("banking77"), path)
    assert [e.input for e in examples] == [f"t{i}" for i in range(6)]  # unknown intent skipped
    assert [e.input for e in load_eval_examples("banking77", path, limit=2)] == ["t0", "t1"]


class _RecordingLoader:
    """Stands in for ``datasets.load_dataset``, which needs the network (no hub access here):
    records what it was asked for and returns a real in-memory ``datasets.Dataset``."""

    def __init__(self, make):
        self.calls, self.make = [], make

    def __call__(self, name, config=None, split=None, **kwargs):
        self.calls.append((name, config, split))
        return self.make(split)


def test_hub_source_is_loaded_with_the_task_names_and_classlabels_mapped(monkeypatch):
    """The hub path cannot run offline, so ``datasets.load_dataset`` is replaced by a stand-in;
    the test shows it is called with the task's hub name/config/splits and that integer labels
    are mapped to names through the dataset's ClassLabel feature."""
    import datasets

    names = sorted(get_task("banking77").labels)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})

    def make(split):
        n = 10 if split == "train" else 4
        return datasets.Dataset.from_dict({"text": [f"{split} q{i}" for i in range(n)], "label": [i % 3 for i in range(n)]},
                                          features=features)

    loader = _RecordingLoader(make)
    monkeypatch.setattr(datasets, "load_dataset", loader)
    data = load_task_data(DataConfig(task="banking77", validation_split="test"))
    assert loader.calls == [("PolyAI/banking77", None, "train"), ("PolyAI/banking77", None, "test")]
    assert (len(data.train), len(data.validation)) == (10, 4)
    assert data.train[1].completion == " activate my card" and data.train[0].reference == "Refund_not_showing_up"

    loader.calls.clear()
    load_task_data(DataConfig(task="banking77", hub_name="me/banking", hub_config="v2", split="test"))
    assert loader.calls == [("me/banking", "v2", "test")]

    def failing(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(ValueError, match="could not load hub dataset 'tau/commonsense_qa'.*data.path"):
        load_task_data(DataConfig(task="commonsense_qa"))
    with pytest.raises(ValueError, match="no hub dataset: set data.path"):
        load_task_data(DataConfig(task="raw_text"))
