"""Issue 16 acceptance figure: a task mixture's banking77 accuracy against a banking77-only adapter that saw the
same banking77 examples, and the mixture adapter against the base on every task.

    .venv/bin/python benchmarks/mixture_accuracy.py [--banking 3000] [--share 0.6] [--base DIR] [--reuse] [--set KEY=VALUE ...]

Steps, as a user would run them: hold out 1000 banking77 rows (shared data); `lorafleet base build` on the text of
the other banking77 rows and of the DialogSum dialogues (unlabelled; skipped with --base); then two
fine-tunes with `jobs/finetune.py` from the same settings (`--epochs`, LoRA r=32, learning rate 3e-3, 32 examples
per step):
- banking77 only: `--banking` training rows (jobs/configs/banking77-lora.yaml with those settings);
- the mixture (jobs/configs/mixture-lora.yaml): the same banking77 rows at weight `--share`, DialogSum, generated
  claims and chat rows sharing the rest, `data.mixture_size` = banking / share, so each banking77 row is drawn once
  per epoch in both runs.
`lorafleet eval --task banking77` scores both adapters on the held-out rows; `lorafleet eval --config` scores the base
and the mixture adapter on every dataset's held-out rows. Prints JSON lines and a table; writes
benchmarks/results/mixture_accuracy.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, save, table  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MIXTURE = "jobs/configs/mixture-lora.yaml"


def run(cmd: list[str], env: dict) -> float:
    t = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - t, 1)


def evaluate(lf: str, args: list[str], env: dict) -> dict:
    out = subprocess.run([lf, "eval", *args], cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def write_data(work: Path, a) -> dict[str, Path]:
    """Held-out and training banking77 rows, DialogSum, generated claims and chat rows; the base's corpus."""
    from lorafleet.sample_data import claim_rows

    with open(a.data, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(7).shuffle(rows)
    held, train = rows[:1000], rows[1000:]
    paths = {"held_out": work / "held_out.csv", "banking": work / "train.csv", "claims": work / "claims.csv",
             "chat": work / "chat.jsonl", "corpus": work / "corpus.txt"}
    for key, part in (("held_out", held), ("banking", train)):
        with open(paths[key], "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows({"text": r["text"], "category": r["category"]} for r in part)
    with open(paths["claims"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(claim_rows(200))
    chat = [{"messages": [{"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": "This is about " + r["category"].replace("_", " ") + "."}]}
            for r in train[-600:]]
    paths["chat"].write_text("".join(json.dumps(c) + "\n" for c in chat))
    dialogues = [json.loads(line)["dialogue"] for line in open(a.dialogsum, encoding="utf-8") if line.strip()]
    paths["corpus"].write_text("\n".join([r["text"] for r in train] + [d.replace("\n", " ") for d in dialogues]) + "\n")
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "banking77" / "train.csv"))
    ap.add_argument("--dialogsum", default=str(SHARED / "dialogsum" / "dialogsum.dev.jsonl"))
    ap.add_argument("--banking", type=int, default=3000, help="banking77 training rows, each seen once by both adapters")
    ap.add_argument("--share", type=float, default=0.6, help="banking77's weight in the mixture (the rest: 0.1 DialogSum, "
                                                             "claims and chat evenly)")
    ap.add_argument("--base", help="an existing base folder (skips `lorafleet base build`)")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench-mixture"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both fine-tunes")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of both fine-tunes (each banking77 row seen this often)")
    ap.add_argument("--reuse", action="store_true", help="keep the adapters a previous run trained in --work; evaluate only")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LORAFLEET_HOME": str(work)}
    env.pop("RAY_ADDRESS", None)
    paths = write_data(work, a)
    py, lf = sys.executable, str(Path(sys.executable).with_name("lorafleet"))
    timings = {}
    base = Path(a.base).resolve() if a.base else work / "base"
    if not a.base:
        timings["base_build_s"] = run([lf, "base", "build", "--out", str(base), "--corpus", str(paths["corpus"])], env)

    stamp = int(time.time())  # a new run name each time: re-running a name would resume it (or refuse other settings)
    rest = (1 - a.share) / 3
    weights = {"banking77": a.share, "dialogsum": rest, "claims": rest, "chat": rest}
    common = [f"model.name_or_path={base}", f"training.num_epochs={a.epochs}", "training.max_steps=null", *a.set]
    only = common + [f"data.path={paths['banking']}", f"data.max_train_samples={a.banking}", f"run_name=bench-banking-only-{stamp}",
                     f"output_dir={work / 'banking-only'}"]
    mixture = common + [f"data.mixture.0.path={paths['banking']}", f"data.mixture.0.max_train_samples={a.banking}",
                        f"data.mixture.1.path={a.dialogsum}", f"data.mixture.2.path={paths['claims']}",
                        f"data.mixture.3.path={paths['chat']}", f"data.mixture_size={round(a.banking / a.share)}",
                        *[f"data.mixture.{i}.weight={w}" for i, w in enumerate(weights.values())],
                        f"run_name=bench-mixture-{stamp}", f"output_dir={work / 'mixture'}"]
    # The same LoRA and optimisation for both: the mixture config's (its max_seq_length fits DialogSum).
    shared = ["lora.r=32", "lora.lora_alpha=64", "training.learning_rate=3e-3", "training.per_device_batch_size=16",
              "training.gradient_accumulation_steps=1", "training.max_seq_length=512", "data.max_eval_samples=100"]
    sets = lambda xs: [y for x in shared + xs for y in ("--set", x)]  # noqa: E731
    if not (a.reuse and (work / "mixture" / "result.json").is_file() and (work / "banking-only" / "result.json").is_file()):
        timings["banking_only_s"] = run([py, "jobs/finetune.py", "--config", "jobs/configs/banking77-lora.yaml", *sets(only)], env)
        timings["mixture_s"] = run([py, "jobs/finetune.py", "--config", MIXTURE, *sets(mixture)], env)
    results = json.loads((work / "mixture" / "result.json").read_text())
    drawn = results["metrics"]["data/banking77/drawn"]

    records = []
    for label, adapter in (("base", "none"), ("banking77-only", work / "banking-only" / "adapter"), ("mixture", work / "mixture" / "adapter")):
        r = evaluate(lf, ["--base", str(base), "--adapter", str(adapter), "--task", "banking77", "--data", str(paths["held_out"])], env)
        records.append(emit({"measurement": "held_out_banking77", "model": label, "accuracy": r["accuracy"],
                             "macro_f1": r["macro_f1"], "examples": r["examples"]}))
    per_task = {}
    for label, adapter in (("base", "none"), ("mixture", str(work / "mixture" / "adapter"))):
        per_task[label] = evaluate(lf, ["--config", MIXTURE, "--adapter", adapter, *sets(mixture)], env)
        emit({"measurement": "mixture_tasks", "model": label, **per_task[label]})
    gap = records[1]["accuracy"] - records[2]["accuracy"]
    summary = {"banking77_examples_each": a.banking, "banking77_drawn_in_mixture": drawn, "weights": weights,
               "accuracy_gap_points": round(100 * gap, 1), "target_points": 5, "met": gap <= 0.05,
               "mixture_beats_base_on": sorted(n for n, t in per_task["mixture"]["tasks"].items()
                                               if t["loss"] < per_task["base"]["tasks"][n]["loss"]), **timings}
    save("mixture_accuracy", records, summary, per_task=per_task)
    print(table(records, ["model", "accuracy", "macro_f1", "examples"]))
    rows = [{"task": n, **{f"{m} {k}": v for m in ("base", "mixture") for k, v in per_task[m]["tasks"][n].items()
                            if k not in ("task", "examples")}} for n in per_task["mixture"]["tasks"]]
    print(table(rows, sorted({k for r in rows for k in r}, key=lambda k: (k != "task", k))))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
