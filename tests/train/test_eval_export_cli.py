"""``lorafleet eval`` and ``lorafleet export --merge`` honour --device/--dtype (CPU here): export writes
the dtype asked for (default: the base's own), its outputs equal PEFT's own merge in that dtype;
eval reports where and in what it ran; bad values get a clear error and exit status 2."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from lorafleet.cli import main
from testutils import banking_rows, write_rows
from tiny_models import save_tiny_base


def safetensors_dtypes(path) -> set[str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny float32 base and a LoRA adapter with non-zero A and B (so merging changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("export")
    base = save_tiny_base(d / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(d / "adapter")
    return base, d / "adapter"


def peft_merge_logits(base, adapter, dtype, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).merge_and_unload()
    with torch.no_grad():
        return merged(input_ids=ids).logits


@pytest.mark.parametrize("dtype_arg, want", [(None, "F32"), ("bfloat16", "BF16")])
def test_export_merge_writes_the_dtype_and_equals_peft_merge(base_and_adapter, tmp_path, dtype_arg, want):
    from transformers import AutoModelForCausalLM

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    argv = ["export", "--base", str(base), "--adapter", str(adapter), "--merge", "--out", str(out), "--device", "cpu"]
    assert main(argv + (["--dtype", dtype_arg] if dtype_arg else [])) == 0
    assert safetensors_dtypes(out / "model.safetensors") == {want}
    torch_dtype = torch.bfloat16 if want == "BF16" else torch.float32
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, peft_merge_logits(base, adapter, torch_dtype, ids), rtol=0, atol=0)


def test_export_keeps_a_bf16_base_in_bf16_by_default(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny_base(tmp_path / "base16", dtype=torch.bfloat16)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    assert main(["export", "--base", str(base), "--adapter", str(tmp_path / "a"), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert safetensors_dtypes(tmp_path / "m" / "model.safetensors") == {"BF16"}


def test_eval_reports_device_and_dtype(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    data = write_rows(tmp_path / "test.csv", banking_rows(6, seed=5))
    argv = ["eval", "--base", str(base), "--adapter", str(adapter), "--task", "banking77", "--data", str(data), "--batch-size", "4"]
    assert main(argv + ["--device", "cpu", "--dtype", "bfloat16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["device"] == "cpu" and res["dtype"] == "bfloat16" and res["examples"] == 6 and "accuracy" in res
    assert main(argv) == 0  # auto on a machine without CUDA: CPU in float32
    res = json.loads(capsys.readouterr().out)
    assert (res["device"], res["dtype"]) == (("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32"))


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "banana"], "is not a device"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_device_is_a_clear_error(base_and_adapter, tmp_path, capsys, extra, message):
    base, adapter = base_and_adapter
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--merge", "--out", str(tmp_path / "m"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "use" in err
    assert not (tmp_path / "m").exists()


def test_bad_dtype_is_refused_by_the_parser(base_and_adapter, capsys):
    base, adapter = base_and_adapter
    with pytest.raises(SystemExit) as exc:
        main(["export", "--base", str(base), "--adapter", str(adapter), "--merge", "--out", "x", "--dtype", "int8"])
    assert exc.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_eval_config_scores_every_dataset_of_a_mixture_custom_tasks_included(base_and_adapter, tmp_path, capsys):
    """`lorafleet eval --config`: one call, each dataset's held-out rows (the config's split and limits), its loss
    and metrics under its own name, a weighted score; a custom task (prompt template in the YAML) is scored too."""
    base, adapter = base_and_adapter
    bank = write_rows(tmp_path / "bank.csv", banking_rows(40, seed=5))
    config = tmp_path / "mix.yaml"
    config.write_text(f"""model: {{name_or_path: {base}}}
data:
  max_eval_samples: 3
  mixture:
    - {{task: banking77, path: {bank}, weight: 3}}
    - name: topic
      path: {bank}
      custom_task: {{prompt_template: "Text: {{text}}\\nTopic:", label_column: category, metric: exact_match}}
      max_eval_samples: 5
training: {{max_seq_length: 64}}
""")
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--config", str(config), "--adapter", str(adapter), "--batch-size", "4", "--predictions", str(preds)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["base"] == str(base) and res["data"] == "banking77+topic" and set(res["tasks"]) == {"banking77", "topic"}
    bank_res, topic = res["tasks"]["banking77"], res["tasks"]["topic"]
    assert (bank_res["examples"], topic["examples"]) == (3, 5)  # each dataset's own limit
    assert {"loss", "accuracy", "macro_f1"} <= set(bank_res) and {"loss", "exact_match"} <= set(topic)
    assert res["eval_score"] == pytest.approx(0.75 * bank_res["accuracy"] + 0.25 * topic["exact_match"])
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["dataset"] for r in lines] == ["banking77"] * 3 + ["topic"] * 5
    # the adapter is really applied: the base alone has another loss on the same rows
    assert main(["eval", "--config", str(config), "--adapter", "none", "--set", "data.max_eval_samples=1"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["tasks"]["banking77"]["examples"] == 1 and alone["tasks"]["banking77"]["loss"] != pytest.approx(bank_res["loss"])
    assert main(["eval", "--config", str(config), "--task", "banking77"]) == 2
    assert "--config takes the tasks, files and columns from the config" in capsys.readouterr().err
    assert main(["eval", "--task", "banking77"]) == 2
    assert "needs --base, --task and --data (one task), or --config" in capsys.readouterr().err
