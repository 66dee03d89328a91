"""PiSSA/OLoRA adapters change the base weights while training; lorafleet saves them converted to a
plain LoRA over the untouched base. Oracle: the trained (base-mutated) model's own outputs, against
a fresh base from disk + the saved adapter through PEFT + Transformers offline; and the server's
adapter validation accepts the folder."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.data import collate_batch
from lorafleet.train.checkpoint import export_model
from lorafleet.train.loop import backward_token_normalised
from lorafleet.train.model import wrap_peft
from tiny_models import feature, finetune_cfg, save_tiny_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("pissa-base"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_mutating_init_is_saved_as_a_plain_lora_with_the_trained_outputs(init, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet.serve.validation import BaseModelSpec, inspect_adapter

    cfg = finetune_cfg(init_lora_weights=init, target_modules=["q_proj", "v_proj", "down_proj"])
    pristine = AutoModelForCausalLM.from_pretrained(base_dir)
    model = wrap_peft(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    q_name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    mutated = dict(model.named_parameters())[q_name]
    assert not torch.allclose(mutated, pristine.model.layers[0].self_attn.q_proj.weight)  # what makes it unservable as is

    vocab = pristine.config.vocab_size
    batch = collate_batch([feature(5, 6, seed=s, vocab_size=vocab) for s in range(4)], pristine.config.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        backward_token_normalised(model, [batch], torch.device("cpu"))
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        untrained = pristine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (trained - untrained).abs().max() > 1e-3  # training changed the outputs

    folder = tmp_path / "adapter"
    from lorafleet.data.tasks import get_task

    export_model(folder, model, tokenizer=None, method="lora", prompt_format=get_task("banking77").prompt_format())
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["init_lora_weights"] is True and conf["r"] == 2 * cfg.lora.r and conf["lora_alpha"] == 2 * cfg.lora.lora_alpha

    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    with torch.no_grad():
        got = served(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)
    # Loading the plain LoRA left the base weights as they are on disk.
    torch.testing.assert_close(served.get_base_model().model.layers[0].self_attn.q_proj.weight,
                               pristine.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)

    info = inspect_adapter(folder, BaseModelSpec.from_model(str(base_dir)), max_lora_rank=64, max_bytes=10**8)
    assert info.rank == 2 * cfg.lora.r
    assert info.prompt_format["template"] == "Query: {text}\nIntent:"  # the prompt format travels with the adapter
