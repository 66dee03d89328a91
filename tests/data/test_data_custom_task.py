"""Tasks defined in the YAML (data.custom_task) read real banking77 and DialogSum files, train the way
the catalogue's tasks do, and are scored with the metrics they name."""

from __future__ import annotations

import json

import pytest

from lorafleet.config import DataConfig
from lorafleet.data import compute_metrics, load_task_data, tokenize_examples
from data_helpers import BANKING_CSV, DIALOGSUM


@pytest.mark.skipif(not BANKING_CSV.is_file(), reason=f"banking77 data not found at {BANKING_CSV}")
def test_custom_classification_matches_the_catalogue_task():
    custom = DataConfig(path=str(BANKING_CSV), custom_task={
        "name": "intent", "prompt_template": "Query: {text}\nIntent:", "label_column": "category"})
    data = load_task_data(custom)
    catalogue = load_task_data(DataConfig(task="banking77", path=str(BANKING_CSV)))
    assert data.task.name == "intent" and data.task.metrics == ("accuracy", "macro_f1")
    assert data.train == catalogue.train and data.validation == catalogue.validation and data.labels == catalogue.labels
    refs = [e.reference for e in data.validation[:4]]
    assert compute_metrics(data.task, [r.replace("_", " ") for r in refs[:3]] + ["nonsense"], refs) ["accuracy"] == 0.75
    # A closed label set skips and counts the other rows.
    two = load_task_data(custom.model_copy(update={"custom_task": custom.custom_task.model_copy(
        update={"labels": ["card_arrival", "lost_or_stolen_card"]})}))
    assert data.labels and two.labels == ["card_arrival", "lost_or_stolen_card"]
    assert two.stats["skipped_unknown_label"] == two.stats["rows_read"] - two.stats["rows_used"] > 9000


@pytest.mark.skipif(not DIALOGSUM.is_file(), reason=f"dialogsum data not found at {DIALOGSUM}")
def test_custom_generation_task_with_several_columns(tmp_path, tokenizer):
    rows = [json.loads(line) for line in DIALOGSUM.read_text(encoding="utf-8").splitlines()[:20]]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(path=str(path), custom_task={"prompt_template": "Topic: {topic}\n{dialogue}\nSummary:",
                                                  "completion_column": "summary", "metric": "rougeL"})
    data = load_task_data(cfg)
    ex = next(e for e in data.train + data.validation if e.reference == rows[0]["summary"].strip())
    assert ex.prompt == f"Topic: {rows[0]['topic'].strip()}\n{rows[0]['dialogue'].strip()}\nSummary:"
    assert ex.completion == " " + rows[0]["summary"].strip() and data.task.kind == "generation"
    assert compute_metrics(data.task, [ex.reference], [ex.reference]) == {"rouge_l": 1.0}
    features, _ = tokenize_examples(data.train, tokenizer, 1024, data.task)
    assert all(f["labels"][0] == -100 and f["labels"][-1] == tokenizer.eos_token_id for f in features)
    # A column the template names that the file lacks: the error names it and the columns found.
    bad = cfg.model_copy(update={"custom_task": cfg.custom_task.model_copy(update={"prompt_template": "{speaker}: {dialogue}"})})
    with pytest.raises(ValueError, match=r"task 'custom'.*lacks field 'speaker'.*Columns found: \['fname', 'dialogue'"):
        load_task_data(bad)
