"""``make demo``: the main job end to end on the embedded default.

Local Ray, local MLflow store (SQLite under ./lorafleet-work), a tiny base model built on
the spot from sample text the project generates itself, then a real Ray Train LoRA
fine-tune (FSDP2 on 2 CPU workers), tracked and registered in MLflow, evaluated against
the base alone. No network and no data from outside the project.

    .venv/bin/python -m lorafleet.demo [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n=== [{n}/{total}] {text}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="lorafleet-work/demo", help="folder for everything the demo writes")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LORAFLEET_HOME", str(work))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()

    from lorafleet import sample_data
    from lorafleet.base.build import BaseBuildConfig, PretrainConfig, build_base
    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.evaluate import evaluate_adapter
    from lorafleet.tracking import list_registered_adapters
    from lorafleet.train import run_finetune

    total = 4
    _stage(1, total, "sample data: intent queries (8 intents) and an unlabelled corpus, generated locally")
    data_dir = work / "data"
    rows = sample_data.intent_rows(n_per_intent=80, seed=0)
    sample_data.write_csv(data_dir / "intents_train.csv", rows[:520])
    sample_data.write_csv(data_dir / "intents_test.csv", rows[520:])
    corpus = sample_data.write_corpus(data_dir / "corpus.txt")
    print(f"    {data_dir}/intents_train.csv (520 rows), intents_test.csv ({len(rows) - 520} rows), corpus.txt")

    _stage(2, total, "tiny base: BPE tokenizer + 4-layer Llama, pre-trained on the corpus by a Ray Train job (method full)")
    base = work / "base"
    info = build_base(BaseBuildConfig(out=str(base), corpus=[str(corpus)], pretrain=PretrainConfig(num_epochs=6)))
    print(f"    {base}: {info['parameters']:,} parameters, vocab {info['vocab_size']}, "
          f"pre-train eval loss {info['pretrain_metrics'].get('eval_loss', float('nan')):.3f}")

    _stage(3, total, "LoRA fine-tune: intent detection, FSDP2 across 2 Ray Train workers, MLflow-tracked and registered")
    cfg = load_config(FinetuneConfig, Path(__file__).resolve().parents[2] / "jobs/configs/banking77-lora.yaml", [
        f"model.name_or_path={base}", f"data.path={data_dir / 'intents_train.csv'}", "run_name=demo-intent",
        "training.num_epochs=6", "training.per_device_batch_size=8", "checkpoint.every_n_steps=40", "tracking.experiment_name=demo",
        "tracking.register_as=demo-intent", f"output_dir={work / 'outputs' / 'demo-intent'}"])
    res = run_finetune(cfg)
    m = res["metrics"]
    print(f"    validation accuracy {m.get('eval_accuracy', 0):.3f}, macro-F1 {m.get('eval_macro_f1', 0):.3f}, "
          f"{m.get('tokens_per_s', 0):.0f} tokens/s, registered {res['registered_model']} v{res['registered_version']}")

    _stage(4, total, "held-out evaluation (lorafleet eval): base alone vs base + adapter")
    test_csv = str(data_dir / "intents_test.csv")
    base_m = evaluate_adapter(str(base), None, "banking77", test_csv)
    lora_m = evaluate_adapter(str(base), res["adapter_path"], "banking77", test_csv,
                              predictions=str(work / "outputs" / "demo-intent" / "predictions.jsonl"))
    print(f"    base alone: accuracy {base_m['accuracy']:.3f}   base + LoRA: accuracy {lora_m['accuracy']:.3f} "
          f"({lora_m['examples']} held-out queries)")

    uri = f"sqlite:///{work}/mlflow.db"
    summary = {
        "elapsed_s": round(time.time() - started, 1),
        "base_model": str(base),
        "adapter": res["adapter_path"],
        "result_json": str(Path(res["adapter_path"]).parent / "result.json"),
        "loss_curve": res["loss_curve"],
        "held_out_accuracy": {"base": base_m["accuracy"], "base+lora": lora_m["accuracy"]},
        "registered": [f"{r['name']} v{r['version']}" for r in list_registered_adapters(uri)],
    }
    print("\n=== summary\n" + json.dumps(summary, indent=2))
    print(f"\nMLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
