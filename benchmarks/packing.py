"""Packing SFT examples (issue 16): tokens/s and final validation loss with `training.packing` off and on.

    flock /tmp/lorafleet-heavy.lock .venv/bin/python benchmarks/packing.py [--rounds 2] [--quick]

A mixed-length mixture of real data: banking77 queries (-> intent, ~25 tokens) and DialogSum
dialogues (-> summary, a few hundred tokens), from ../shared/data, shuffled together into one
JSONL file trained as a `custom_task` (prompt -> completion). The same tiny base (a random
Llama: speed does not depend on its weights, and LoRA still learns the completions' token
statistics, which the validation loss shows) is fine-tuned with LoRA through `jobs/finetune.py`
exactly as a user runs it (its own local Ray, 1 worker), one epoch over the same examples with
packing off, then on. Unpacked, `per_device_batch_size` examples are right-padded to the longest
of each batch; packed, whole examples share rows of `max_seq_length` tokens and the batch size
in rows is chosen so that both runs take about the same number of optimizer steps of about the
same number of real tokens (same schedule, so the losses compare). Validation is unpacked in both.

tokens/s counts real (non-padding) tokens and comes from the job's own step metrics
(`result.json` history; evaluation time is outside the windows); "train_s" is the time of
those windows summed. Rounds alternate off / on with a different training seed per round, so
the spread of the final validation loss between rounds of the same setting is the noise that
the packed/unpacked difference is compared with. Writes benchmarks/results/packing.json.
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_base, emit, median, parameters, save, table  # noqa: E402

TARGET = 1.3
SHARED = REPO.parent / "shared" / "data"
BANKING_CSV = SHARED / "banking77" / "train.csv"
DIALOGSUM = SHARED / "dialogsum" / "dialogsum.dev.jsonl"


def mixture(path: Path, n_banking: int, n_dialogsum: int, seed: int = 0) -> list[dict]:
    """prompt/completion rows: banking77 intents and DialogSum summaries, shuffled together."""
    for f in (BANKING_CSV, DIALOGSUM):
        if not f.is_file():
            raise SystemExit(f"benchmark data not found: {f} (see ../shared/data/README.md)")
    with BANKING_CSV.open(encoding="utf-8") as f:
        banking = [{"prompt": f"Query: {r['text']}\nIntent:", "completion": r["category"].replace("_", " ")}
                   for r in csv.DictReader(f)]
    with DIALOGSUM.open(encoding="utf-8") as f:
        dialogues = [json.loads(line) for line in f]
    dialogsum = [{"prompt": f"Dialogue:\n{d['dialogue']}\nSummary:", "completion": d["summary"]} for d in dialogues]
    rng = random.Random(seed)
    rows = rng.sample(banking, n_banking) + rng.sample(dialogsum, min(n_dialogsum, len(dialogsum)))
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def shape_of_data(base: Path, rows: list[dict], max_len: int) -> dict:
    """Lengths of the tokenised examples and how many packed rows they make (lorafleet's own code)."""
    from transformers import AutoTokenizer

    from lorafleet.data import Example, pack_features, tokenize_examples

    tok = AutoTokenizer.from_pretrained(base)
    examples = [Example(prompt=r["prompt"], completion=" " + r["completion"], input=r["prompt"], reference=r["completion"])
                for r in rows]
    features, stats = tokenize_examples(examples, tok, max_len, "summarization")
    lengths = sorted(len(f["input_ids"]) for f in features)
    return {"examples": len(features), "skipped_too_long": stats["skipped_too_long"], "tokens": stats["tokens"],
            "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1],
            "packed_rows": len(pack_features(features, max_len))}


def finetune(base: Path, data: Path, work: Path, a, packing: bool, batch: int, seed: int, tag: str) -> dict:
    run = f"bench-packing-{tag}-{int(time.time())}"
    out = work / "runs" / run
    config = {
        "run_name": run, "method": "lora", "output_dir": str(out),
        "model": {"name_or_path": str(base), "dtype": "float32", "attn_implementation": "sdpa"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"custom_task": {"name": "mixture", "prompt_template": "{prompt}", "completion_column": "completion"},
                 "path": str(data), "validation_fraction": 0.2, "seed": 0},
        "training": {"num_epochs": 1, "learning_rate": a.lr, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
                     "per_device_batch_size": batch, "max_seq_length": a.max_len, "packing": packing, "seed": seed,
                     "logging_steps": 5, "eval_batch_size": 16, "generation_metrics": False},
        "distributed": {"num_workers": 1, "strategy": "ddp"},
        "checkpoint": {"every_n_steps": 100000},
        "tracking": {"enabled": False},
    }
    path = work / f"{run}.yaml"
    path.write_text("# python jobs/finetune.py --config THIS_FILE (written by benchmarks/packing.py)\n" + yaml.safe_dump(config))
    env = {**os.environ, "LORAFLEET_HOME": str(work / "home")}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    subprocess.run([sys.executable, "jobs/finetune.py", "--config", str(path)], cwd=REPO, env=env, check=True,
                   stdout=None if a.verbose else subprocess.DEVNULL, stderr=None if a.verbose else subprocess.DEVNULL)
    wall = time.monotonic() - started
    res = json.loads((out / "result.json").read_text())
    windows = [h for h in res["history"] if "tokens_per_s" in h]
    tokens, train_s, seen = 0, 0.0, 0
    for h in windows:  # each window: the real tokens since the previous one, at its rate
        n = h["tokens_seen"] - seen
        seen = h["tokens_seen"]
        tokens += n
        train_s += n / h["tokens_per_s"]
    m = res["metrics"]
    return {"packing": packing, "seed": seed, "batch": batch, "steps": m["steps_total"], "tokens": tokens,
            "train_s": train_s, "tokens_per_s": tokens / train_s, "eval_loss": m["eval_loss"],
            "first_train_loss": windows[0]["train_loss"], "rows": m["data/packed_rows" if packing else "data/train_examples"],
            "peak_memory_mb": m["peak_memory_mb"], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--banking", type=int, default=2000, help="banking77 queries in the mixture")
    ap.add_argument("--dialogsum", type=int, default=500, help="DialogSum dialogues in the mixture (500 in the dev file)")
    ap.add_argument("--max-len", type=int, default=512, help="training.max_seq_length (the packed row length)")
    # 32 examples of this mixture hold about 5.0 packed rows: both runs then take the same number of steps.
    ap.add_argument("--batch", type=int, default=32, help="examples per batch unpacked")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--quick", action="store_true", help="a small mixture and base, one round (smoke test)")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench"))
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.banking, a.dialogsum = 1, 200, 50
    work = Path(a.work).resolve()
    base = build_base(work / ("packing-base-quick" if a.quick else "packing-base"), hidden=128 if a.quick else 256,
                      layers=2 if a.quick else 4, intermediate=256 if a.quick else 704, heads=2 if a.quick else 4)
    data = work / "packing-mixture.jsonl"
    rows = mixture(data, a.banking, a.dialogsum)
    shape = shape_of_data(base, rows, a.max_len)
    # Packed rows per batch for about the same optimizer steps (and real tokens per step) as unpacked.
    packed_batch = max(1, round(a.batch * shape["packed_rows"] / shape["examples"]))
    print(f"base {base}: {parameters(base):,} parameters; mixture {data.name}: {a.banking} banking77 + {a.dialogsum} DialogSum "
          f"-> {shape['examples']} examples of median {shape['median_tokens']} / max {shape['max_tokens']} tokens "
          f"({shape['skipped_too_long']} over {a.max_len}), {shape['packed_rows']} packed rows; batch {a.batch} examples "
          f"unpacked, {packed_batch} rows packed", flush=True)

    records = []
    for r in range(a.rounds):
        seed = 42 + r
        for packing in (False, True):
            rec = finetune(base, data, work, a, packing, packed_batch if packing else a.batch, seed,
                           f"{'on' if packing else 'off'}-{r}")
            records.append(emit({"bench": "packing", "round": r, **rec}))
    off = [x for x in records if not x["packing"]]
    on = [x for x in records if x["packing"]]
    ratios = [b["tokens_per_s"] / u["tokens_per_s"] for u, b in zip(off, on)]
    ratio = median(ratios)
    loss_off, loss_on = median(x["eval_loss"] for x in off), median(x["eval_loss"] for x in on)
    # Noise: how far the final validation loss moves with the training seed alone, within one setting.
    spreads = [max(x["eval_loss"] for x in s) - min(x["eval_loss"] for x in s) for s in (off, on) if len(s) > 1]
    noise = max(spreads) if spreads else None
    summary = {"ratio_tokens_per_s_packed_over_unpacked": ratio, "ratios_per_round": ratios, "target": TARGET,
               "met": ratio >= TARGET, "eval_loss_unpacked": loss_off, "eval_loss_packed": loss_on,
               "eval_loss_difference": loss_on - loss_off, "eval_loss_seed_spread": noise,
               "loss_within_noise": None if noise is None else abs(loss_on - loss_off) <= noise,
               "train_s_unpacked": median(x["train_s"] for x in off), "train_s_packed": median(x["train_s"] for x in on),
               "data": shape, "packed_batch_rows": packed_batch, "parameters": parameters(base)}
    print(table(records, ["packing", "round", "seed", "rows", "batch", "steps", "tokens", "train_s", "tokens_per_s", "eval_loss",
                          "peak_memory_mb", "wall_s"]))
    print(f"\npacked / unpacked tokens/s: median {ratio:.2f} over {len(ratios)} round(s) "
          f"({', '.join(f'{x:.2f}' for x in ratios)}; target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'})")
    print(f"final validation loss: unpacked {loss_off:.4f}, packed {loss_on:.4f} (difference {loss_on - loss_off:+.4f}; "
          + (f"seed-to-seed spread {noise:.4f}: {'within' if summary['loss_within_noise'] else 'OUTSIDE'} noise)"
             if noise is not None else "one round: no seed spread to compare with)"))
    emit({"bench": "packing", "summary": summary})
    save("packing", records, summary, settings=vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
