"""FSDP2 sharded loading (``lorafleet.train.parallel.load_fsdp2_model``) on 2 real gloo ranks.

Each test starts two processes of this file (``python test_sharded_loading.py --rank R ...``),
each building the real model from a tiny random Llama saved as safetensors by the test:
- the sharded-loaded model's full state dict equals the checkpoint bit for bit, tied
  embeddings stay tied, and LoRA training gives exactly the losses of the full-load path;
- no rank holds more than its share: the bytes of parameter storage a rank allocates while
  loading, and its peak RSS growth, stay well under the full model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "banking77-lora.yaml"
SETS = ["training.max_seq_length=64", "lora.r=8", "lora.lora_alpha=16", "training.learning_rate=1e-2"]


def make_base(out: Path, hidden: int, layers: int, vocab: int, tie: bool, dtype: str = "float32") -> Path:
    """A random Llama saved like ``save_pretrained`` does (safetensors + config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 4, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
    return out


def launch(mode: str, base: Path, out: Path, world: int = 2, *extra: str) -> list[dict]:
    """Run this file's worker on ``world`` ranks; each rank's JSON result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = out / "data.csv"
    data.write_text("text,category\nhello,greeting\n", encoding="utf-8")
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--mode", mode, "--base", str(base), "--data", str(data),
               "--out", str(out / f"rank{rank}.json"), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tie,method", [(True, "lora"), (False, "lora"), (True, "full")], ids=["tied-lora", "untied-lora", "tied-full"])
def test_sharded_load_equals_checkpoint_and_trains_like_full_load(tmp_path, tie, method):
    base = make_base(tmp_path / "base", hidden=64, layers=2, vocab=301, tie=tie)  # odd vocab: uneven shards
    ranks = launch("check", base, tmp_path, 2, "--set", f"method={method}")
    r0 = ranks[0]
    assert r0["sharded_path_used"] and r0["state_dict_mismatches"] == [], r0["state_dict_mismatches"]
    assert r0["checked_tensors"] >= 2 * 9 + 2
    assert r0["tied_after_load"] == tie
    if method == "lora":
        # LoRA weights are the ones wrap_peft drew on the full-load path (not zeros, not re-drawn).
        assert r0["lora_a_equal"] and r0["lora_a_nonzero"]
    else:
        assert r0["trainable_params"] == r0["total_params"]
    # Every rank holds a different half; both report the same losses.
    assert ranks[0]["local_param_bytes"] < 0.6 * r0["full_param_bytes"]
    assert ranks[0]["losses_sharded"] == ranks[1]["losses_sharded"]
    assert r0["losses_sharded"] == r0["losses_full_load"], (r0["losses_sharded"], r0["losses_full_load"])
    assert r0["losses_sharded"][-1] < r0["losses_sharded"][0]


def test_no_rank_materialises_the_full_model(tmp_path):
    # ~18M parameters (71 MB in float32): large enough for RSS to tell a shard from the whole.
    base = make_base(tmp_path / "base", hidden=512, layers=4, vocab=8000, tie=False)
    new = launch("memory", base, tmp_path, 2)
    full = new[0]["full_param_bytes"]
    for r in new:
        assert r["sharded_path_used"]
        # This rank keeps its half of every tensor (the odd rows of uneven splits aside) ...
        assert r["local_param_bytes"] <= 0.51 * full, (r, full)
        # ... and never held more than that plus one tensor's rows in flight: the whole model
        # would be 1.0 (the full-load path measures >= 1.0; see benchmarks/sharded_loading.py).
        assert r["peak_anon_growth_bytes"] < 0.7 * full, (r, full)


def test_sharded_qlora_load_equals_from_pretrained_qlora(tmp_path):
    # bf16 checkpoint (how hub bases ship), odd vocab: uneven shards of the unquantised tensors.
    base = make_base(tmp_path / "base", hidden=128, layers=2, vocab=301, tie=False, dtype="bfloat16")
    ranks = launch("qlora", base, tmp_path, 2, "--set", "method=qlora")
    for r in ranks:
        assert r["sharded_path_used"] and r["n_4bit_layers"] == 2 * 7
        # Each rank's shard of every parameter (packed NF4 data included) and every layer's
        # quant_state (absmax, double-quantisation statistics) equal the from_pretrained model's ...
        assert r["local_shard_mismatches"] == [] and r["quant_state_mismatches"] == [], r
        assert r["local_4bit_bytes"] < 0.6 * r["full_4bit_bytes"]
        # ... so the logits and loss on the same batch agree, and training follows the same losses.
        assert r["max_abs_logit_diff"] <= 1e-5, r["max_abs_logit_diff"]
        assert r["losses_sharded"] == r["losses_full_load"], (r["losses_sharded"], r["losses_full_load"])
        assert r["losses_sharded"][-1] < r["losses_sharded"][0]


@pytest.mark.slow
def test_no_rank_materialises_the_full_qlora_model(tmp_path):
    base = make_base(tmp_path / "base", hidden=512, layers=4, vocab=8000, tie=False, dtype="bfloat16")
    ranks = launch("memory", base, tmp_path, 2, "--set", "method=qlora")
    full_fp32 = ranks[0]["full_param_bytes"] * 2  # a bf16 checkpoint: the float32 model is twice its size
    for r in ranks:
        assert r["sharded_path_used"]
        # The whole model in float32 (what from_pretrained reads before quantising) never lands on a
        # rank, nor the whole NF4 model (embeddings and lm_head stay float32: ~0.5 x here): only the
        # rank's half of it, its quant states and one weight in flight.
        assert r["peak_anon_growth_bytes"] < 0.5 * full_fp32, (r, full_fp32)  # the whole NF4 model: 0.53 x


# ---------------------------------------------------------------------------- worker (one process per rank)


class PeakAnonRss:
    """Peak anonymous resident memory of this process, sampled every millisecond by a thread.

    Anonymous only: the safetensors files are memory-mapped, and the file pages a rank touches
    count in ``ru_maxrss`` although they are shared page cache, not a copy the rank holds.
    """

    def __init__(self):
        import threading

        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def warm_imports() -> None:
    """Import what loading imports lazily, so that import memory (~250 MB) is not counted as loading."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    try:  # method qlora
        import bitsandbytes  # noqa: F401
        import transformers.integrations.bitsandbytes  # noqa: F401
        import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    except ImportError:
        pass


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from lorafleet.config import FinetuneConfig, load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sets = [f"model.name_or_path={args.base}", f"data.path={args.data}", f"output_dir={Path(args.out).parent / 'out'}", *SETS, *args.set]
    cfg = load_config(FinetuneConfig, CONFIG, sets)
    device = torch.device("cpu")
    result: dict = {}
    from safetensors.torch import load_file

    from lorafleet.train.model import count_parameters, load_base_model, wrap_peft
    from lorafleet.train.parallel import apply_fsdp2, load_fsdp2_model

    result["full_param_bytes"] = sum(p.stat().st_size for p in Path(args.base).glob("*.safetensors"))
    if args.mode == "memory":
        warm_imports()
        torch.manual_seed(0)
        with PeakAnonRss() as mem:
            model = load_fsdp2_model(cfg, device)
        result["sharded_path_used"] = model is not None
        result["local_param_bytes"] = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        result["peak_anon_growth_bytes"] = mem.growth
    elif args.mode == "qlora":
        result.update(_compare_qlora(cfg, device, rank))
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from lorafleet.train.model import checkpoint_key
        from lorafleet.train.parallel import causal_lm_of

        torch.manual_seed(0)
        sharded = load_fsdp2_model(cfg, device)
        result["sharded_path_used"] = sharded is not None
        lm = causal_lm_of(sharded)
        result["tied_after_load"] = lm.lm_head.weight is lm.model.embed_tokens.weight
        result["local_param_bytes"] = sum(p.to_local().numel() * p.element_size() for p in sharded.parameters())
        full_sd = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True))
        ckpt = load_file(str(Path(args.base) / "model.safetensors"))
        mismatches, checked = [], 0
        for name, value in full_sd.items():
            key = checkpoint_key(name)
            if "lora_" in name or (key not in ckpt and key == "lm_head.weight"):
                continue
            checked += 1
            if key not in ckpt or value.dtype != ckpt[key].dtype or not torch.equal(value, ckpt[key]):
                mismatches.append(name)
        result["state_dict_mismatches"], result["checked_tensors"] = mismatches, checked

        torch.manual_seed(0)
        full = apply_fsdp2(wrap_peft(load_base_model(cfg, device), cfg), cfg, device)
        full_load_sd = get_model_state_dict(causal_lm_of(full), options=StateDictOptions(full_state_dict=True))
        lora_keys = [k for k in full_sd if "lora_A" in k]
        result["lora_a_equal"] = bool(lora_keys) and all(torch.equal(full_sd[k], full_load_sd[k]) for k in lora_keys)
        result["lora_a_nonzero"] = all(bool(full_sd[k].abs().sum() > 0) for k in lora_keys)
        result["trainable_params"], result["total_params"] = count_parameters(sharded)
        result["losses_sharded"] = _train(sharded, cfg, rank)
        result["losses_full_load"] = _train(full, cfg, rank)
    Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _compare_qlora(cfg, device, rank: int) -> dict:
    """The sharded-loaded QLoRA model against ``from_pretrained(quantization_config=...)`` + FSDP2 (the oracle)."""
    import bitsandbytes as bnb
    import torch

    from lorafleet.train.model import load_base_model, wrap_peft
    from lorafleet.train.parallel import apply_fsdp2, causal_lm_of, load_fsdp2_model

    torch.manual_seed(0)
    sharded = load_fsdp2_model(cfg, device)
    torch.manual_seed(0)
    full = apply_fsdp2(wrap_peft(load_base_model(cfg, device), cfg), cfg, device)
    result: dict = {"sharded_path_used": sharded is not None}
    params_full = dict(full.named_parameters())
    mismatches, local_4bit, full_4bit = [], 0, 0
    for name, p in sharded.named_parameters():
        q = params_full[name]
        a, b = p.to_local(), q.to_local()
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)):
            mismatches.append(name)
        if ".base_layer.weight" in name:
            local_4bit += a.numel() * a.element_size()
            full_4bit += p.numel() * p.element_size()
    result["local_shard_mismatches"], result["local_4bit_bytes"], result["full_4bit_bytes"] = mismatches, local_4bit, full_4bit
    layers_full = {n: m for n, m in causal_lm_of(full).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    qs_mismatches = []
    for n, m in causal_lm_of(sharded).named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            x, y = m.quant_state, layers_full[n].quant_state
            same = (x.shape == y.shape and x.dtype == y.dtype and x.blocksize == y.blocksize and x.quant_type == y.quant_type
                    and torch.equal(x.absmax, y.absmax) and torch.equal(x.code, y.code)
                    and (x.state2 is None) == (y.state2 is None)
                    and (x.state2 is None or (torch.equal(x.offset, y.offset) and torch.equal(x.state2.absmax, y.state2.absmax))))
            if not same:
                qs_mismatches.append(n)
    result["n_4bit_layers"], result["quant_state_mismatches"] = len(layers_full), qs_mismatches
    gen = torch.Generator().manual_seed(7 + rank)
    ids = torch.randint(0, sharded.config.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        la = sharded(input_ids=ids, labels=ids)
        lb = full(input_ids=ids, labels=ids)
    result["max_abs_logit_diff"] = (la.logits - lb.logits).abs().max().item()
    result["losses_sharded"] = _train(sharded, cfg, rank)
    result["losses_full_load"] = _train(full, cfg, rank)
    return result


def _train(model, cfg, rank: int, steps: int = 4) -> list[float]:
    """A few AdamW steps on one fixed batch of random tokens per rank (loss must fall); the mean loss per step."""
    import torch
    import torch.distributed as dist

    from lorafleet.train.loop import build_optimizer

    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(100 + rank)
    vocab = model.config.vocab_size if hasattr(model, "config") else 301
    ids = torch.randint(0, vocab, (2, 16), generator=gen)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["check", "memory", "qlora"], required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    _worker(ap.parse_args())
