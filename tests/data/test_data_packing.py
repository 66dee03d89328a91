"""Packing whole SFT examples into rows (``pack_features``) and collating packed rows, at token level, on
real banking77 queries and DialogSum dialogues tokenised by a real BPE tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from data_helpers import DIALOGSUM
from lorafleet.data import Example, collate_batch, pack_features, tokenize_examples
from testutils import banking_rows

IGNORE = -100


def _mixture(tokenizer, max_seq_length: int) -> list[dict]:
    """Short (banking77 query -> intent) and long (dialogue -> summary) features, interleaved."""
    if not DIALOGSUM.is_file():
        pytest.skip(f"DialogSum data not found at {DIALOGSUM}")
    short = [Example(prompt=f"Query: {r['text']}\nIntent:", completion=" " + r["category"].replace("_", " "),
                     input=r["text"], reference=r["category"]) for r in banking_rows(60, seed=3)]
    with DIALOGSUM.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:20]
    long = [Example(prompt=f"Dialogue:\n{r['dialogue']}\nSummary:", completion=" " + r["summary"], input=r["dialogue"],
                    reference=r["summary"]) for r in rows]
    examples = short + long
    random.Random(0).shuffle(examples)
    features, stats = tokenize_examples(examples, tokenizer, max_seq_length, "summarization")
    assert stats["skipped_too_long"] < len(long)  # some dialogues fit: the mixture really mixes lengths
    return features


def _split(row: dict) -> list[dict]:
    """The features of a packed row, cut where position_ids restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [{k: row[k][a:b] for k in row} for a, b in zip(starts, starts[1:])]


def test_packed_rows_hold_every_example_whole_with_its_labels_and_restarted_positions(tokenizer):
    max_len = 512
    features = _mixture(tokenizer, max_len)
    rows = pack_features(features, max_len)

    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= max_len for r in rows)
    pieces = [p for r in rows for p in _split(r)]
    # Every example exactly once, whole: same tokens; its labels kept except the first token's, which would
    # otherwise be predicted from the previous example's last token.
    key = lambda f: tuple(f["input_ids"])
    assert sorted(map(key, pieces)) == sorted(map(key, features))
    by_ids = {key(f): f for f in features}
    for p in pieces:
        f = by_ids[key(p)]
        assert p["position_ids"] == list(range(len(f["input_ids"])))
        assert p["labels"] == [IGNORE] + f["labels"][1:]
        assert p["input_ids"][0] == tokenizer.bos_token_id  # rows restart with bos at each example
    # Positions restart exactly at example starts (each starts with bos), nowhere else.
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(r["input_ids"][i] == tokenizer.bos_token_id for i in starts)
    # The same target tokens as unpacked (position 0 never has a prediction anyway).
    targets = lambda fs: sum(t != IGNORE for f in fs for t in f["labels"][1:])
    assert targets(rows) == targets(features)
    # Much less padding: rows are nearly full, where one example per row leaves most of a batch empty.
    fill = sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_len)
    assert len(rows) < len(features) / 3 and fill > 0.8, (len(rows), len(features), fill)
    # Deterministic (every rank packs the same rows), and the order of the input decides it.
    assert pack_features(features, max_len) == rows


def test_pack_refuses_features_longer_than_a_row():
    with pytest.raises(ValueError, match="more than max_seq_length=4"):
        pack_features([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}], 4)


def test_best_fit_decreasing_fills_rows():
    lengths = [6, 5, 4, 3, 2, 2, 1, 1]  # 24 tokens: three rows of 8 exactly
    features = [{"input_ids": [10 + i] * n, "labels": [10 + i] * n} for i, n in enumerate(lengths)]
    rows = pack_features(features, 8)
    assert [[p["input_ids"][0] - 10 for p in _split(r)] for r in rows] == [[0, 4], [1, 3], [2, 5, 6, 7]]


def test_collate_packed_rows_gives_position_ids_and_marks_real_tokens(tokenizer):
    pad = tokenizer.pad_token_id
    rows = pack_features([{"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]},
                          {"input_ids": [1, 8, 9, 4], "labels": [IGNORE, IGNORE, 9, 4]}], max_seq_length=6)
    batch = collate_batch(rows, pad)
    assert batch["input_ids"].tolist() == [[1, 8, 9, 4, 1, 7], [1, 5, 6, pad, pad, pad]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 9, 4, IGNORE, 7], [IGNORE, 5, 6, IGNORE, IGNORE, IGNORE]]
    # Padding restarts at 0 like one more example, so no real token sees it (it comes last) or counts it.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]  # real tokens, for tokens/s
    with pytest.raises(ValueError, match="1 of 2 features have position_ids"):
        collate_batch([rows[0], {"input_ids": [1, 2], "labels": [1, 2]}], pad)
