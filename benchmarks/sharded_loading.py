"""Memory per rank while loading a base for FSDP2: full load then shard (before) vs sharded loading.

    python benchmarks/sharded_loading.py [--world 2] [--hidden 768 --layers 10 --vocab 16000] [--methods lora,qlora]

Builds a random Llama of ~100M parameters, saved as safetensors in bfloat16 (how hub bases
ship) and in float32, in a temporary folder. For each checkpoint and path it starts ``--world``
gloo ranks (one process each, like Ray Train's workers) that load it exactly as the training
worker does with ``distributed.strategy: fsdp`` (model dtype float32, ``auto`` on CPU):
- ``full_then_shard``: ``load_base_model`` (``from_pretrained``) + ``wrap_peft`` + ``apply_fsdp2``,
  the path before sharded loading;
- ``sharded``: ``load_fsdp2_model`` (meta device, ``fully_shard``, each rank reads its rows).
Method ``lora`` for both checkpoints; method ``qlora`` (NF4, double quantisation, float32 storage)
for the bf16 one: ``full_then_shard`` is ``from_pretrained(quantization_config=...)`` on every rank,
``sharded`` builds 4-bit layers on meta and quantises one weight at a time, keeping its rows.
Each rank reports the peak growth during the load (sampled every millisecond) of its private
memory (RssAnon: what the rank really holds; on a GPU the full copy lands in device memory) and
of its whole RSS (adds the checkpoint pages read through the memory map: shared page cache), as
multiples of the float32 model's size; the parameter bytes it keeps; the load time.
Goal: sharded private peak <= 0.6 x the full model on every rank.
Prints one JSON line per rank and path, a table, and writes benchmarks/results/sharded_loading.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, free_port, save, table  # noqa: E402

CONFIG = REPO / "jobs" / "configs" / "banking77-lora.yaml"
PATHS = ("full_then_shard", "sharded")
CHECKPOINT_DTYPES = ("bfloat16", "float32")  # how the base is stored; the model is float32 either way
GOAL = 0.6
METHODS = ("lora", "qlora")


class PeakRss:
    """Peak growth of this process's resident memory, sampled every millisecond from /proc/self/status.

    ``anon``: private memory (what a rank really holds; on a GPU the analogue is device memory).
    ``total`` (VmRSS) adds the checkpoint file pages the process has touched through its
    memory map: shared, evictable page cache, but it shows how much of the file a rank reads.
    """

    FIELDS = ("RssAnon", "VmRSS")

    def __init__(self):
        self.base = self.now()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def now(cls) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in cls.FIELDS:
                values[key] = int(line.split()[1]) * 1024
        return values

    def _sample(self):
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self):
        while not self._stop.wait(0.001):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth(self, field: str) -> int:
        return self.peak[field] - self.base[field]


def build_random_llama(out: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random untied Llama saved as safetensors twice: ``out/float32`` and ``out/bfloat16``; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out / "float32")
    model.to(torch.bfloat16).save_pretrained(out / "bfloat16")
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """One rank: load the base by ``args.path`` and write what it cost."""
    import torch
    import torch.distributed as dist

    # Import what loading imports lazily, so that import memory is not counted as loading.
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.train.model import load_base_model, wrap_peft
    from lorafleet.train.parallel import apply_fsdp2, load_fsdp2_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(FinetuneConfig, CONFIG, [f"model.name_or_path={args.base}", f"data.path={args.data}",
                                               f"output_dir={Path(args.out).parent / 'out'}", "lora.r=16", "lora.lora_alpha=32",
                                               f"method={args.method}"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    started = time.perf_counter()
    with PeakRss() as mem:
        model = load_fsdp2_model(cfg, device) if args.path == "sharded" else None
        if model is None:
            if args.path == "sharded":
                raise RuntimeError("load_fsdp2_model fell back to the full load")
            model = apply_fsdp2(wrap_peft(load_base_model(cfg, device), cfg), cfg, device)
    dist.barrier()
    seconds = time.perf_counter() - started
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())  # the loaded model (NF4 for qlora), all ranks
    Path(args.out).write_text(json.dumps({
        "rank": dist.get_rank(), "peak_anon_growth_bytes": mem.growth("RssAnon"), "local_param_bytes": local,
        "loaded_model_bytes": whole,
        "peak_total_growth_bytes": mem.growth("VmRSS"), "load_s": seconds}))
    dist.destroy_process_group()


def run_path(path: str, base: Path, tmp: Path, world: int, method: str) -> list[dict]:
    port = free_port()
    data = tmp / "data.csv"
    data.write_text("text,category\nhello,greeting\n", encoding="utf-8")
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(REPO / "platform"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", "--path", path, "--method", method, "--base", str(base), "--data", str(data),
               "--out", str(tmp / f"{path}-{rank}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=900)[0]
        if p.returncode != 0:
            raise RuntimeError(f"{path} rank failed:\n{log[-4000:]}")
    return [json.loads((tmp / f"{path}-{rank}.json").read_text()) for rank in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0

    records = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-shardbench-") as tmp_name:
        tmp = Path(tmp_name)
        n_params = build_random_llama(tmp, args.hidden, args.layers, args.vocab)
        full = n_params * 4  # the model is float32 on CPU (model.dtype auto): a full copy is this many bytes
        methods = [m for m in args.methods.split(",") if m]
        runs = [(m, ckpt) for m in methods for ckpt in (CHECKPOINT_DTYPES if m == "lora" else ("bfloat16",))]
        for method, ckpt in runs:
            for path in PATHS:
                for r in run_path(path, tmp / ckpt, tmp, args.world, method):
                    rec = {"bench": "sharded_loading", "method": method, "checkpoint": ckpt, "path": path, "world": args.world,
                           "rank": r["rank"], "parameters": n_params, "model_mb": full / 2**20,
                           "loaded_model_mb": r["loaded_model_bytes"] / 2**20,
                           "private_over_loaded_model": r["peak_anon_growth_bytes"] / r["loaded_model_bytes"],
                           "peak_private_mb": r["peak_anon_growth_bytes"] / 2**20,
                           "private_over_model": r["peak_anon_growth_bytes"] / full,
                           "peak_rss_mb": r["peak_total_growth_bytes"] / 2**20,
                           "rss_over_model": r["peak_total_growth_bytes"] / full,
                           "kept_mb": r["local_param_bytes"] / 2**20, "load_s": r["load_s"]}
                    records.append(emit(rec))

    def worst(method: str, path: str, field: str) -> float:
        return max(r[field] for r in records if r["path"] == path and r["method"] == method)

    summary = {"parameters": n_params, "model_mb": full / 2**20, "world": args.world, "goal_private_over_model": GOAL}
    for method in methods:
        prefix = "" if method == "lora" else f"{method}_"  # the lora keys keep their earlier names
        fields = ("private_over_model", "rss_over_model") + (("private_over_loaded_model",) if method != "lora" else ())
        summary.update({f"{prefix}{field}_{path}": worst(method, path, field) for path in PATHS for field in fields})
        if method != "lora":
            summary[f"{method}_loaded_model_mb"] = next(r["loaded_model_mb"] for r in records if r["method"] == method)
    summary["met"] = all(summary[k] <= GOAL for k in summary if k.endswith("private_over_model_sharded"))
    print(table(records, ["method", "checkpoint", "path", "rank", "model_mb", "loaded_model_mb", "peak_private_mb",
                          "private_over_model", "private_over_loaded_model", "peak_rss_mb", "rss_over_model", "kept_mb", "load_s"]))
    print(json.dumps({"bench": "sharded_loading", "summary": summary}))
    save("sharded_loading", records, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
