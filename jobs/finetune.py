"""Fine-tune one LoRA/QLoRA adapter with Ray Train.

    python jobs/finetune.py --config jobs/configs/banking77-lora.yaml --set training.learning_rate=3e-4
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --config ...

Locally it starts a Ray instance; under ``ray job submit`` it joins the cluster. Writes to the
work dir unless the config says otherwise: ``$LORAFLEET_HOME``, else ./lorafleet-work, or
~/lorafleet-work under ``ray job submit --working-dir`` (whose working directory is Ray's
temporary copy; relative output paths are refused there). Prints where everything goes first,
and the path of result.json (metrics, MLflow run id, registered version, adapter path) last.
"""

import json
import logging
import sys

from lorafleet.config import FinetuneConfig
from lorafleet.config.base import job_config
from lorafleet.tracking import resolve_tracking_uri
from lorafleet.train import run_finetune


def main(argv=None) -> int:
    cfg = job_config(FinetuneConfig, __doc__, argv, "YAML file (see jobs/configs/)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mlflow = resolve_tracking_uri(cfg.tracking) if cfg.tracking.enabled else "off"
    print(f"[finetune {cfg.run_name}] outputs: {cfg.resolved_output_dir()}  checkpoints: "
          f"{cfg.resolved_storage_path()}/{cfg.run_name}  MLflow: {mlflow}", flush=True)
    result = run_finetune(cfg)
    print(json.dumps({k: result[k] for k in ("metrics", "adapter_path", "mlflow_run_id", "registered_model", "registered_version")}, indent=2))
    print(f"result: {cfg.resolved_output_dir() / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
