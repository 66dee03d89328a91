"""Search LoRA hyperparameters with Ray Tune; every trial is a distributed Ray Train run.

    python jobs/sweep.py --config jobs/configs/banking77-sweep.yaml --set sweep.num_samples=8
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/sweep.py --config ...

Re-running the same sweep name resumes it: finished trials are kept, unfinished ones continue
from their checkpoints. Prints a results table and the path of result.json.
"""

import logging
import sys

from lorafleet.config.base import job_config
from lorafleet.config.sweep import SweepConfig
from lorafleet.tune import run_sweep


def main(argv=None) -> int:
    cfg = job_config(SweepConfig, __doc__, argv, "YAML file with `sweep:` and `finetune:` sections")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
