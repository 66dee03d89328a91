"""data.custom_task: a task defined in the YAML is validated when the config loads, every mistake named."""

from __future__ import annotations

import pytest
import yaml

from lorafleet.config import ConfigError, FinetuneConfig, load_config


def _load(tmp_path, data: dict):
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": data}))
    return load_config(FinetuneConfig, path)


def test_a_valid_custom_task_names_the_run_task(tmp_path):
    cfg = _load(tmp_path, {"path": "intents.csv", "custom_task": {
        "name": "intent", "prompt_template": "Query: {text}\nIntent:", "label_column": "category",
        "labels": ["card_arrival", "lost_card"], "metric": ["accuracy", "rougeL"]}})
    assert cfg.data.task == "intent" and cfg.data.custom_task.metric_names() == ("accuracy", "rouge_l")
    # The dumped config (what Ray workers receive) validates again unchanged.
    assert FinetuneConfig.model_validate(cfg.model_dump()).data == cfg.data
    summary = _load(tmp_path, {"custom_task": {"prompt_template": "Dialogue:\n{dialogue}\nSummary:",
                                                "completion_column": "summary"}})
    assert summary.data.task == "custom" and summary.data.custom_task.metric_names() == ("rouge_l",)


def test_custom_task_mistakes_are_all_listed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, {"custom_task": {"prompt_template": "Query: {text\nIntent:", "labels": ["a"],
                                          "metric": ["accuracy", "bleu"]}})
    msg = str(exc.value)
    assert "prompt_template is not a valid template" in msg
    assert "exactly one of completion_column (generate text) or label_column (classify); got neither" in msg
    assert "custom_task.labels (a closed label set) needs custom_task.label_column" in msg
    assert "'bleu', which lorafleet does not compute; choose from accuracy, macro_f1, exact_match, rouge_l" in msg
    with pytest.raises(ConfigError, match=r"must name the data's columns in braces.*got '0'"):
        _load(tmp_path, {"custom_task": {"prompt_template": "Q: {0}", "completion_column": "a"}})
    with pytest.raises(ConfigError, match="both name the task"):
        _load(tmp_path, {"task": "banking77", "custom_task": {"prompt_template": "{q}", "completion_column": "a"}})
    with pytest.raises(ConfigError, match="data.task is required"):
        _load(tmp_path, {"path": "x.csv"})


def test_metric_names_are_the_ones_lorafleet_computes():
    from lorafleet.config.train import METRIC_NAMES
    from lorafleet.data import METRICS

    assert sorted(METRICS) == sorted(METRIC_NAMES)
