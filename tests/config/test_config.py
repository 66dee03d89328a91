"""Config loading: strict keys, dotted overrides, every error listed, failure before Ray starts."""

import subprocess
import sys
import time

import pytest

from lorafleet.config import ConfigError, FinetuneConfig, load_config
from lorafleet.train.parallel import deepspeed_config
from testutils import REPO

CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_validates_and_documents_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("python jobs/" in first or "serve " in first or "lorafleet" in first), first
    if "finetune.py" in first:
        cfg = load_config(FinetuneConfig, path)
        assert cfg.run_name


def test_overrides_are_parsed_and_validated():
    cfg = load_config(FinetuneConfig, REPO / "jobs/configs/banking77-lora.yaml",
                      ["lora.r=4", "training.learning_rate=3e-4", "lora.target_modules=[q_proj,v_proj]", "data.path=x.csv"])
    assert cfg.lora.r == 4 and cfg.training.learning_rate == 3e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.path == "x.csv"


def test_all_errors_are_listed_together():
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, REPO / "jobs/configs/banking77-lora.yaml",
                    ["lora.rank=8", "training.learning_rate=-1", "distributed.strategy=zero", "training.lr=1", "oops"])
    msg = str(exc.value)
    assert len(exc.value.errors) == 5, exc.value.errors
    for needle in ("lora.rank: unknown key", "training.learning_rate", "(got -1)", "distributed.strategy", "training.lr: unknown key", "'oops'"):
        assert needle in msg, (needle, msg)


def test_cross_field_rules_show_both_values():
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, REPO / "jobs/configs/banking77-lora.yaml",
                    ["distributed.strategy=deepspeed", "training.mixed_precision=bf16"])
    msg = str(exc.value)
    assert "DeepSpeed runs on GPUs only" in msg and "mixed_precision (bf16) needs distributed.use_gpu" in msg


def test_deepspeed_config_is_validated_and_rendered():
    cfg = load_config(FinetuneConfig, REPO / "jobs/configs/banking77-lora.yaml",
                      ["distributed.use_gpu=true", "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3",
                       "distributed.deepspeed.offload_param=cpu", "training.gradient_accumulation_steps=4"])
    ds = deepspeed_config(cfg, world_size=12)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert ds["train_batch_size"] == cfg.training.per_device_batch_size * 4 * 12 and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match=r"offload_param \(cpu\) needs zero_stage 3 \(got 2\)"):
        load_config(FinetuneConfig, REPO / "jobs/configs/banking77-lora.yaml",
                    ["distributed.use_gpu=true", "distributed.strategy=deepspeed", "distributed.deepspeed.offload_param=cpu"])


def test_bad_config_fails_fast_in_the_job_script_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nmodel: {name_or_path: m}\ndata: {task: banking77}\ntraining: {epochs: 3}\nlora: {r: 0}\n")
    t0 = time.time()
    p = subprocess.run([sys.executable, "jobs/finetune.py", "--config", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert "training.epochs: unknown key" in p.stderr and "lora.r" in p.stderr
    assert "Started a local Ray instance" not in p.stderr + p.stdout
    assert time.time() - t0 < 60
