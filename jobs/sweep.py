"""Search LoRA hyperparameters with Ray Tune; every trial is a distributed Ray Train run.

    python jobs/sweep.py --config jobs/configs/banking77-sweep.yaml --set sweep.num_samples=8
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/sweep.py --config ...

Re-running the same sweep name resumes it: finished trials are kept, unfinished ones continue
from their checkpoints. Defaults go to the work dir as for jobs/finetune.py (~/lorafleet-work
under ``ray job submit --working-dir`` unless $LORAFLEET_HOME is set; relative output paths are
refused there). Prints where everything goes, then a results table and the path of result.json.
"""

import logging
import sys

from lorafleet.config.base import job_config
from lorafleet.config.sweep import SweepConfig
from lorafleet.tracking import resolve_tracking_uri
from lorafleet.tune import run_sweep


def main(argv=None) -> int:
    cfg = job_config(SweepConfig, __doc__, argv, "YAML file with `sweep:` and `finetune:` sections")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ft = cfg.finetune
    mlflow = resolve_tracking_uri(ft.tracking) if ft.tracking.enabled else "off"
    print(f"[sweep {cfg.sweep.name}] Tune results: {cfg.sweep.resolved_storage_path()}/{cfg.sweep.name}  trial checkpoints: "
          f"{ft.resolved_storage_path()}  MLflow: {mlflow}", flush=True)
    result = run_sweep(cfg)
    best = result["best"]
    if best:
        print(f"best trial {best['trial_id']}: {result['metric']}={best['metric']:.4f} {best['params']} "
              f"registered {best['registered_model']} v{best['registered_version']}")
    else:
        print("no trial completed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
