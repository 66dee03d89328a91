"""Training throughput: lorafleet's Ray Train job vs plain `torchrun` + Transformers Trainer, and LoRA vs QLoRA.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 2] [--steps 30] [--quick]

Both sides fine-tune the same base (a random Llama, ~21 M parameters: hidden 512, 6 layers;
speed does not depend on what the weights are) with the same LoRA (r=16, alpha 32, every
linear layer), the same packed blocks of the same corpus (128 tokens, 8 per worker per step),
the same optimizer, schedule and world size (2 processes, gloo, one thread each), and are
timed over the same steps (after a warm-up of 5). lorafleet runs `jobs/finetune.py` exactly as
a user would (its own local Ray, MLflow tracking on, checkpoint at the end); its tokens/s come
from the job's own step metrics (`result.json` history), the baseline's from a Trainer
callback. Rounds alternate lorafleet / torchrun; the ratio is reported per round and as the
median. Then lorafleet with FSDP2, and QLoRA (NF4) vs LoRA under FSDP2: speed and peak memory.
Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_base, corpus_lines, emit, median, parameters, save, table  # noqa: E402

TARGET = 0.95


def lorafleet_run(base: Path, corpus: Path, work: Path, a, strategy: str, method: str, tag: str) -> dict:
    run = f"bench-{tag}-{int(time.time())}"
    out = work / "runs" / run
    sets = [f"model.name_or_path={base}", f"data.path={corpus}", f"run_name={run}", f"method={method}", f"output_dir={out}",
            "data.task=raw_text", "training.packing=true", f"training.max_seq_length={a.block}", f"training.per_device_batch_size={a.batch}",
            f"training.max_steps={a.steps}", "training.logging_steps=5", "training.learning_rate=1e-4", "training.lr_scheduler_type=cosine",
            "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0.0", "lora.target_modules=all-linear",
            f"distributed.num_workers={a.workers}", f"distributed.strategy={strategy}", "checkpoint.every_n_steps=100000",
            "tracking.experiment_name=bench-train"]
    cmd = [sys.executable, "jobs/finetune.py", "--config", "jobs/configs/raw-text-full.yaml"] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "LORAFLEET_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    t = time.monotonic()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL if not a.verbose else None)
    wall = time.monotonic() - t
    res = json.loads((out / "result.json").read_text())
    windows = [h for h in res["history"] if "tokens_per_s" in h and h["step"] > a.warmup]
    # each window holds the same number of tokens: the rate over all of them is the harmonic mean
    rate = len(windows) / sum(1 / h["tokens_per_s"] for h in windows)
    return {"side": "lorafleet", "strategy": strategy, "method": method, "tokens_per_s": rate,
            "peak_memory_mb_per_worker": res["metrics"]["peak_memory_mb"], "windows": len(windows), "wall_s": wall}


def torchrun_run(base: Path, corpus: Path, work: Path, a) -> dict:
    out = work / "runs" / f"torchrun-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.workers),
           "benchmarks/torchrun_lora.py", "--base", str(base), "--corpus", str(corpus), "--block", str(a.block), "--batch", str(a.batch),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--rank", "16", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.monotonic()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL if not a.verbose else None,
                   stderr=subprocess.DEVNULL if not a.verbose else None)
    wall = time.monotonic() - t
    res = json.loads(out.read_text())
    return {"side": "torchrun", "strategy": "ddp", "method": "lora", "tokens_per_s": res["tokens_per_s"],
            "peak_memory_mb_per_worker": res["peak_memory_mb"], "windows": res["steps_timed"], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a small base and few steps (smoke test)")
    ap.add_argument("--no-qlora", action="store_true")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench"))
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.steps, a.block, a.batch = 1, 10, 64, 4
    work = Path(a.work).resolve()
    base = build_base(work / ("train-base-quick" if a.quick else "train-base"), hidden=128 if a.quick else 512, layers=2 if a.quick else 6,
                      intermediate=256 if a.quick else 1408, heads=2 if a.quick else 8)
    corpus = work / "train-corpus.txt"
    corpus.write_text("\n".join(corpus_lines(10000)) + "\n", encoding="utf-8")
    print(f"base {base}: {parameters(base):,} parameters; {a.workers} workers x {a.batch} blocks of {a.block} tokens, "
          f"{a.steps} steps ({a.warmup} warm-up)", flush=True)

    records = []
    ratios = []
    for r in range(a.rounds):
        lf = emit({"bench": "train_throughput", "round": r, **lorafleet_run(base, corpus, work, a, "ddp", "lora", f"ddp-lora-{r}")})
        tr = emit({"bench": "train_throughput", "round": r, **torchrun_run(base, corpus, work, a)})
        ratios.append(lf["tokens_per_s"] / tr["tokens_per_s"])
        records += [lf, tr]
        emit({"bench": "train_throughput", "round": r, "ratio_lorafleet_over_torchrun": ratios[-1]})
    fsdp = emit({"bench": "train_throughput", **lorafleet_run(base, corpus, work, a, "fsdp", "lora", "fsdp-lora")})
    records.append(fsdp)
    if not a.no_qlora:
        qlora = emit({"bench": "train_throughput", **lorafleet_run(base, corpus, work, a, "fsdp", "qlora", "fsdp-qlora")})
        records.append(qlora)

    ratio = median(ratios)
    summary = {"ratio_lorafleet_ddp_over_torchrun_ddp": ratio, "ratios_per_round": ratios, "target": TARGET, "met": ratio >= TARGET,
               "fsdp_over_torchrun": fsdp["tokens_per_s"] / median([x["tokens_per_s"] for x in records if x["side"] == "torchrun"]),
               "parameters": parameters(base)}
    if not a.no_qlora:
        summary.update(qlora_over_lora_speed=qlora["tokens_per_s"] / fsdp["tokens_per_s"],
                       qlora_over_lora_peak_memory=qlora["peak_memory_mb_per_worker"] / fsdp["peak_memory_mb_per_worker"])
    print(table(records, ["side", "strategy", "method", "round", "tokens_per_s", "peak_memory_mb_per_worker", "wall_s"]))
    print(f"\nlorafleet (DDP) / torchrun (DDP) tokens/s: median {ratio:.3f} over {len(ratios)} round(s) "
          f"(target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'})")
    emit({"bench": "train_throughput", "summary": summary})
    save("train_throughput", records, summary, settings=vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
