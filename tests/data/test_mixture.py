"""Task mixtures: the config (shared and per-dataset fields, clear refusals), the weighted draw, loading each
dataset split on its own, and what a mixture reports (metric names, score, prompt format, fingerprint)."""

from __future__ import annotations

from collections import Counter

import pytest

from lorafleet.config import ConfigError, FinetuneConfig, validate_config
from lorafleet.config.sweep import SweepConfig
from lorafleet.config.train import DataConfig
from lorafleet.data import load_task_data
from lorafleet.data.mixture import datasets_of, draw_mixture, load_training_data, mixture_score
from lorafleet.data.prompt_format import check_prompt_format
from lorafleet.sample_data import claim_rows
from testutils import BANKING_CSV, DIALOGSUM, banking_rows, write_rows


def mixture_cfg(tmp_path, **extra) -> DataConfig:
    claims = write_rows(tmp_path / "claims.csv", claim_rows(40))
    return DataConfig(mixture=[
        {"task": "banking77", "path": str(BANKING_CSV), "weight": 2, "max_train_samples": 300},
        {"task": "dialogsum", "path": str(DIALOGSUM), "weight": 1, "max_train_samples": 100, "max_eval_samples": 5},
        {"task": "classification", "name": "claims", "path": str(claims), "labels": ["claim", "not_claim"], "weight": 1},
    ], **extra)


def test_draw_gives_each_dataset_its_weighted_share_repeating_small_ones_evenly():
    drawn = draw_mixture([100, 10, 50], [2, 1, 1], total=160, seed=0)
    counts = Counter(i for i, _ in drawn)
    assert len(drawn) == 160 and counts == {0: 80, 1: 40, 2: 40}
    small = Counter(j for i, j in drawn if i == 1)
    assert set(small.values()) == {4}  # 40 draws of 10 examples: each exactly 4 times
    big = [j for i, j in drawn if i == 0]
    assert len(set(big)) == 80  # down-sampled without repeats
    assert draw_mixture([100, 10, 50], [2, 1, 1], total=160, seed=0) == drawn  # same on every rank and resume
    assert draw_mixture([100, 10, 50], [2, 1, 1], total=160, seed=1) != drawn
    assert len(draw_mixture([3, 3, 3], [1, 1, 1], total=10)) == 10  # remainders go somewhere, the sum holds
    assert draw_mixture([5], [1]) == [(0, j) for j in range(5)]  # a single task: every example once, in order
    with pytest.raises(ValueError, match="at least one training example"):
        draw_mixture([5, 0], [1, 1])


def test_a_mixture_loads_each_dataset_with_its_own_split_limits_and_shared_defaults(tmp_path):
    cfg = mixture_cfg(tmp_path, seed=7, validation_fraction=0.25)
    data = load_training_data(cfg)
    assert [p.name for p in data.parts] == ["banking77", "dialogsum", "claims"]
    assert [round(p.weight, 3) for p in data.parts] == [0.5, 0.25, 0.25]
    assert data.name == "banking77+dialogsum+claims" and data.describe() == "banking77:0.5,dialogsum:0.25,claims:0.25"
    # each dataset is split exactly as a single-task run on it would be (shared seed and fraction applied)
    alone = load_task_data(DataConfig(task="dialogsum", path=str(DIALOGSUM), seed=7, validation_fraction=0.25,
                                      max_train_samples=100))
    assert [e.input for e in data.parts[1].data.validation] == [e.input for e in alone.validation]
    assert len(data.parts[0].data.train) == 300 and len(data.parts[1].data.train) == 100
    assert data.stats["banking77/train_examples"] == 300 and data.stats["train_examples"] == 300 + 100 + 60
    assert len(data.fingerprint) == 64 and load_training_data(cfg).fingerprint == data.fingerprint
    reweighted = cfg.model_copy(update={"mixture": [cfg.mixture[0].model_copy(update={"weight": 1}), *cfg.mixture[1:]]})
    assert load_training_data(reweighted).fingerprint != data.fingerprint


def test_a_mixture_reports_per_dataset_metrics_and_a_weighted_score(tmp_path):
    data = datasets_of(mixture_cfg(tmp_path))
    names = data.metric_names()
    assert {"eval_loss", "eval_score", "eval/banking77/accuracy", "eval/banking77/loss", "eval/dialogsum/rouge_l",
            "eval/claims/macro_f1"} <= set(names)
    metrics = {"eval/banking77/accuracy": 0.8, "eval/dialogsum/rouge_l": 0.2, "eval/claims/accuracy": 0.6}
    assert mixture_score(data.parts, metrics) == pytest.approx(0.5 * 0.8 + 0.25 * 0.2 + 0.25 * 0.6)
    # a chat dataset has no generation metric: the score is over the others, their weights renormalised
    chat = DataConfig(mixture=[{"task": "banking77", "weight": 3}, {"task": "chat", "weight": 1}])
    parts = datasets_of(chat).parts
    assert mixture_score(parts, {"eval/banking77/accuracy": 0.9}) == pytest.approx(0.9)
    assert "eval/chat/loss" in datasets_of(chat).metric_names()
    # a single task keeps its names
    assert datasets_of(DataConfig(task="banking77")).metric_names()[2:] == ["eval_accuracy", "eval_macro_f1"]


def test_a_mixture_adapter_says_how_to_prompt_each_task(tmp_path):
    fmt = check_prompt_format(datasets_of(mixture_cfg(tmp_path)).prompt_format())
    assert fmt["kind"] == "mixture" and fmt["template"] is None  # chat requests use the base's template
    assert "Query: {text}\\nIntent:" in fmt["description"] and "dialogsum" in fmt["description"]
    assert datasets_of(DataConfig(task="banking77")).prompt_format()["template"] == "Query: {text}\nIntent:"


@pytest.mark.parametrize("data, message", [
    ({"mixture": [{"task": "banking77"}], "path": "x.csv"}, r"data.path belong\(s\) to each dataset of data.mixture"),
    ({"mixture": []}, "data.mixture is empty"),
    ({"mixture": [{"task": "banking77"}, {"task": "banking77"}]}, r"names \['banking77'\] more than once"),
    ({"mixture": [{"task": "banking77", "weight": 0}]}, "greater than 0"),
    ({"mixture": [{"path": "x.csv"}]}, "data.task is required"),
    ({"mixture": [{"task": "banking77", "name": "a b"}]}, "mixture name 'a b'"),
    ({"task": "banking77", "mixture_size": 10}, "data.mixture_size is the size of a task mixture"),
])
def test_bad_mixture_configs_are_refused_with_the_way_out(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(FinetuneConfig, {"model": {"name_or_path": "m"}, "data": data})


def test_a_mixture_config_survives_its_own_dump(tmp_path):
    """Ray workers re-validate the driver's dumped config, every field included."""
    cfg = validate_config(FinetuneConfig, {"model": {"name_or_path": "m"}, "data": mixture_cfg(tmp_path, seed=3).model_dump()})
    again = FinetuneConfig.model_validate(cfg.model_dump())
    assert again == cfg and [d.seed for d in again.data.mixture] == [3, 3, 3]
    assert again.data.mixture[1].max_eval_samples == 5 and again.data.run_task_name() == "banking77+dialogsum+claims"


def test_a_dataset_that_cannot_load_is_named(tmp_path):
    cfg = DataConfig(mixture=[{"task": "banking77", "path": str(BANKING_CSV), "max_train_samples": 50},
                              {"task": "dialogsum", "path": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(FileNotFoundError, match=r"data.mixture\[dialogsum\]: data file or folder not found"):
        load_training_data(cfg)


def test_a_sweep_over_a_mixture_may_optimise_the_score_or_a_dataset_metric(tmp_path):
    bank = write_rows(tmp_path / "b.csv", banking_rows(20))
    finetune = {"model": {"name_or_path": "m"}, "data": {"mixture": [{"task": "banking77", "path": str(bank)},
                                                                    {"task": "chat", "path": str(bank)}]}}
    for metric in ("eval_score", "eval/banking77/accuracy", "eval/chat/loss"):
        validate_config(SweepConfig, {"sweep": {"name": "s", "metric": metric, "space": {}}, "finetune": finetune})
    with pytest.raises(ConfigError, match=r"'eval/chat/accuracy' is never reported .*eval/banking77/accuracy"):
        validate_config(SweepConfig, {"sweep": {"name": "s", "metric": "eval/chat/accuracy", "space": {}}, "finetune": finetune})


def test_set_overrides_reach_a_mixture_dataset_by_index(tmp_path):
    from lorafleet.config import load_config

    path = tmp_path / "mix.yaml"
    path.write_text("model: {name_or_path: m}\ndata:\n  mixture:\n    - {task: banking77}\n    - {task: dialogsum, weight: 2}\n")
    cfg = load_config(FinetuneConfig, path, ["data.mixture.1.path=d.jsonl", "data.mixture.0.weight=3", "data.seed=5"])
    assert [(d.task, d.path, d.weight, d.seed) for d in cfg.data.mixture] == [("banking77", None, 3, 5), ("dialogsum", "d.jsonl", 2, 5)]
    with pytest.raises(ConfigError, match=r"data.mixture is a list of 2; '2' is not one of its indices \(0 to 1\)"):
        load_config(FinetuneConfig, path, ["data.mixture.2.path=x"])
    with pytest.raises(ConfigError, match="data.mixture.0.task is a value, not a section"):
        load_config(FinetuneConfig, path, ["data.mixture.0.task.x=1"])
