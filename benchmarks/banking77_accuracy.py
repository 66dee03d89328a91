"""Issue 2 acceptance figure: LoRA adapter vs the base alone on held-out banking77 queries.

    .venv/bin/python benchmarks/banking77_accuracy.py [--data ../shared/data/banking77/train.csv] [--holdout 1000]

Steps, exactly as a user would run them: hold out N rows of the CSV; `lorafleet base build`
on the text of the remaining rows (unlabelled); `jobs/finetune.py` with
jobs/configs/banking77-lora.yaml on the remaining rows; `lorafleet eval` of the base alone and
base + adapter on the held-out rows. Prints one JSON line per measurement and a Markdown
table; writes benchmarks/results/banking77_accuracy.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> float:
    t = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return round(time.time() - t, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/banking77/train.csv"))
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench-banking77"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides for the fine-tune")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LORAFLEET_HOME": str(work)}
    with open(args.data, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(7).shuffle(rows)
    held, train = rows[: args.holdout], rows[args.holdout :]
    for name, part in (("train.csv", train), ("held_out.csv", held)):
        with open(work / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows({"text": r["text"], "category": r["category"]} for r in part)
    (work / "corpus.txt").write_text("\n".join(r["text"] for r in train) + "\n", encoding="utf-8")

    py = sys.executable
    lf = str(Path(py).with_name("lorafleet"))
    timings = {}
    timings["base_build_s"] = run([lf, "base", "build", "--out", str(work / "base"), "--corpus", str(work / "corpus.txt")], env)
    timings["finetune_s"] = run([py, "jobs/finetune.py", "--config", "jobs/configs/banking77-lora.yaml",
                                 "--set", f"model.name_or_path={work / 'base'}", "--set", f"data.path={work / 'train.csv'}",
                                 "--set", f"output_dir={work / 'out'}", "--set", "run_name=bench-banking77", *sum((["--set", s] for s in args.set), [])], env)
    results = {}
    for label, adapter in (("base", "none"), ("base+lora", str(work / "out" / "adapter"))):
        out = subprocess.run([lf, "eval", "--base", str(work / "base"), "--adapter", adapter, "--task", "banking77",
                              "--data", str(work / "held_out.csv"), "--predictions", str(work / f"preds-{label}.jsonl")],
                             cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
        results[label] = json.loads(out)
        print(json.dumps({"measurement": "held_out_accuracy", "model": label, **results[label]}), flush=True)
    train_metrics = json.loads((work / "out" / "result.json").read_text())["metrics"]
    summary = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
               "held_out_rows": len(held), "train_rows": len(train), "timings": timings,
               "validation_accuracy_during_training": train_metrics.get("eval_accuracy"),
               "tokens_per_s": train_metrics.get("tokens_per_s"), "held_out": results}
    (REPO / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "results" / "banking77_accuracy.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"measurement": "timings", **timings}))
    print("\n| model | held-out accuracy | macro-F1 | examples |\n|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['examples']} |")
    print(f"\nbase build {timings['base_build_s']} s, fine-tune {timings['finetune_s']} s on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
