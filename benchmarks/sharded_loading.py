"""Memory per rank while loading a base for FSDP2: full load then shard (before) vs sharded loading.

    python benchmarks/sharded_loading.py [--world 2] [--hidden 768 --layers 10 --vocab 16000]

Builds a random Llama of ~100M parameters (float32, safetensors, in a temporary folder), then
for each path starts ``--world`` gloo ranks (one process each, like Ray Train's workers) that
load it exactly as the training worker does with ``distributed.strategy: fsdp``:
- ``full_then_shard``: ``load_base_model`` (``from_pretrained``) + ``wrap_peft`` + ``apply_fsdp2``,
  the path before sharded loading (still the path for method qlora);
- ``sharded``: ``load_fsdp2_model`` (meta device, ``fully_shard``, each rank reads its rows).
Each rank reports the peak growth of its anonymous resident memory during the load (sampled
every millisecond; the memory-mapped checkpoint pages are shared page cache, so they are left
out), the parameter bytes it keeps, and the load time. Goal: sharded peak <= 0.6 x the full model.
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
GOAL = 0.6


class PeakAnonRss:
    """Peak anonymous resident memory of this process (``RssAnon``), sampled every millisecond."""

    def __init__(self):
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


def build_random_llama(out: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random untied Llama saved as safetensors; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """One rank: load the base by ``args.path`` and write what it cost."""
    import resource

    import torch
    import torch.distributed as dist

    # Import what loading imports lazily, so that import memory is not counted as loading.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.train.model import load_base_model, wrap_peft
    from lorafleet.train.parallel import apply_fsdp2, load_fsdp2_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(FinetuneConfig, CONFIG, [f"model.name_or_path={args.base}", f"data.path={args.data}",
                                               f"output_dir={Path(args.out).parent / 'out'}", "lora.r=16", "lora.lora_alpha=32"])
    device = torch.device("cpu")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    started = time.perf_counter()
    with PeakAnonRss() as mem:
        model = load_fsdp2_model(cfg, device) if args.path == "sharded" else None
        if model is None:
            if args.path == "sharded":
                raise RuntimeError("load_fsdp2_model fell back to the full load")
            model = apply_fsdp2(wrap_peft(load_base_model(cfg, device), cfg), cfg, device)
    dist.barrier()
    seconds = time.perf_counter() - started
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    Path(args.out).write_text(json.dumps({
        "rank": dist.get_rank(), "peak_anon_growth_bytes": mem.peak - mem.base, "local_param_bytes": local,
        "maxrss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - maxrss0, "load_s": seconds}))
    dist.destroy_process_group()


def run_path(path: str, base: Path, tmp: Path, world: int) -> list[dict]:
    port = free_port()
    data = tmp / "data.csv"
    data.write_text("text,category\nhello,greeting\n", encoding="utf-8")
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(REPO / "platform"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", "--path", path, "--base", str(base), "--data", str(data),
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
        n_params = build_random_llama(tmp / "base", args.hidden, args.layers, args.vocab)
        full = sum(f.stat().st_size for f in (tmp / "base").glob("*.safetensors"))
        for path in PATHS:
            for r in run_path(path, tmp / "base", tmp, args.world):
                rec = {"bench": "sharded_loading", "path": path, "world": args.world, "parameters": n_params,
                       "model_mb": full / 2**20, "peak_mb": r["peak_anon_growth_bytes"] / 2**20,
                       "peak_over_model": r["peak_anon_growth_bytes"] / full, "kept_mb": r["local_param_bytes"] / 2**20,
                       "maxrss_growth_mb": r["maxrss_growth_bytes"] / 2**20, "load_s": r["load_s"], "rank": r["rank"]}
                records.append(emit(rec))
    worst = {p: max(r["peak_over_model"] for r in records if r["path"] == p) for p in PATHS}
    summary = {"parameters": n_params, "model_mb": full / 2**20, "world": args.world,
               "peak_over_model_full_then_shard": worst["full_then_shard"], "peak_over_model_sharded": worst["sharded"],
               "goal_peak_over_model": GOAL, "met": worst["sharded"] <= GOAL}
    print(table(records, ["path", "rank", "model_mb", "peak_mb", "peak_over_model", "kept_mb", "maxrss_growth_mb", "load_s"]))
    print(json.dumps({"bench": "sharded_loading", "summary": summary}))
    save("sharded_loading", records, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
