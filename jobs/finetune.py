"""Fine-tune one LoRA/QLoRA adapter with Ray Train.

    python jobs/finetune.py --config jobs/configs/banking77-lora.yaml --set training.learning_rate=3e-4
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --config ...

Locally it starts a Ray instance; under ``ray job submit`` it joins the cluster. Prints the
path of result.json (metrics, MLflow run id, registered model version, adapter path).
"""

import argparse
import json
import logging
import sys

from lorafleet.config import ConfigError, FinetuneConfig, load_config
from lorafleet.train import run_finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see jobs/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(FinetuneConfig, args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    result = run_finetune(cfg)
    print(json.dumps({k: result[k] for k in ("metrics", "adapter_path", "mlflow_run_id", "registered_model", "registered_version")}, indent=2))
    print(f"result: {cfg.resolved_output_dir() / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
