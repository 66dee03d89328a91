"""Training options that cannot work as configured are refused before Ray starts, all at once, each with
its reason; the ones that work validate."""

import subprocess
import sys

import pytest
import yaml

from lorafleet.config import ConfigError, FinetuneConfig, load_config
from testutils import REPO

CONFIG = REPO / "jobs/configs/banking77-lora.yaml"


def test_unworkable_lora_inits_and_compile_combinations_are_listed_together():
    with pytest.raises(ConfigError) as exc:
        load_config(FinetuneConfig, CONFIG, ["lora.init_lora_weights=loftq", "distributed.use_gpu=true",
                                             "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2",
                                             "training.torch_compile=true"])
    msg = str(exc.value)
    assert "lora.init_lora_weights 'loftq' is not supported" in msg and "neither saves nor serves" in msg
    assert "training.torch_compile (true) is not applied under distributed.strategy 'deepspeed'" in msg

    with pytest.raises(ConfigError, match=r"init_lora_weights 'olora' with method qlora is not supported"):
        load_config(FinetuneConfig, CONFIG, ["method=qlora", "lora.init_lora_weights=olora"])
    with pytest.raises(ConfigError, match=r"mixed_precision \(fp16\) needs distributed.use_gpu"):
        load_config(FinetuneConfig, CONFIG, ["training.mixed_precision=fp16"])
    # Flash attention would let packed examples attend to each other (only eager and sdpa keep them apart).
    with pytest.raises(ConfigError, match=r"training.packing \(true\) with model.attn_implementation flash_attention_2"):
        load_config(FinetuneConfig, CONFIG, ["training.packing=true", "model.attn_implementation=flash_attention_2"])


@pytest.mark.parametrize("sets", [
    ["lora.init_lora_weights=pissa"],
    ["lora.init_lora_weights=olora", "distributed.strategy=ddp"],
    ["training.torch_compile=true", "distributed.num_workers=1"],
    ["training.mixed_precision=fp16", "distributed.use_gpu=true"],
    ["training.packing=true"],
    ["training.packing=true", "model.attn_implementation=sdpa"],
    ["training.packing=true", "model.attn_implementation=eager", "data.task=dialogsum"],
    ["training.packing=true", "model.attn_implementation=flash_attention_2", "data.task=raw_text"],
], ids=["pissa-fsdp", "olora-ddp", "compile-single-worker", "fp16-gpu", "packing-sft", "packing-sdpa", "packing-eager",
        "packing-raw-text-flash"])
def test_workable_options_validate(sets):
    load_config(FinetuneConfig, CONFIG, sets)


def test_loftq_is_refused_by_the_job_script_before_ray_starts(tmp_path):
    path = tmp_path / "loftq.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"task": "banking77"},
                                    "lora": {"init_lora_weights": "loftq"}}))
    p = subprocess.run([sys.executable, "jobs/finetune.py", "--config", str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "'loftq' is not supported" in p.stderr and "Started a local Ray instance" not in p.stdout + p.stderr
