"""Plain helpers shared by tests (import as `from testutils import ...`)."""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BANKING_CSV = SHARED_DATA / "banking77" / "train.csv"
DIALOGSUM = SHARED_DATA / "dialogsum" / "dialogsum.dev.jsonl"


def banking_rows(n: int | None = None, seed: int = 0) -> list[dict]:
    if not BANKING_CSV.is_file():
        pytest.skip(f"banking77 data not found at {BANKING_CSV}")
    with BANKING_CSV.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def registered_steps(run_dir: Path) -> list[int]:
    """Checkpoints Ray Train has registered (every rank reported), from its controller's snapshot (Ray 2.60)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [c["metrics"]["step"] for c in snapshot["checkpoint_results"]]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and clusters the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Scenarios run by `make reliability` only (LORAFLEET_RELIABILITY=1): the ones `make test` covers another way, kept
# out of its 30-minute budget.
reliability_only = pytest.mark.skipif(os.environ.get("LORAFLEET_RELIABILITY") != "1",
                                      reason="reliability suite: run `make reliability` (LORAFLEET_RELIABILITY=1)")


def record_scenario(area: str, scenario: str, *, load: str = "-", faults: str = "-", bad_inputs: str = "-",
                    lost: str = "nothing", outcome: str, **figures) -> None:
    """One row of the reliability report (`make reliability`): what was held, injected and tried,
    what was lost, and the figures behind it. Written only when LORAFLEET_RELIABILITY_LOG names
    a JSON-lines file (make reliability sets it); a plain `make test` run records nothing."""
    path = os.environ.get("LORAFLEET_RELIABILITY_LOG")
    if not path:
        return
    row = {"area": area, "scenario": scenario, "load": load, "faults": faults, "bad_inputs": bad_inputs, "lost": lost,
           "outcome": outcome, "figures": figures, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
