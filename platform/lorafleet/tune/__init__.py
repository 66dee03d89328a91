"""Ray Tune sweeps: search spaces, schedulers, the per-trial Train launcher, results."""

from lorafleet.tune.sweep import derive_max_concurrent_trials, run_sweep

__all__ = ["derive_max_concurrent_trials", "run_sweep"]
