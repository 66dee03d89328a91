"""Plain helpers shared by tests (import as `from testutils import ...`)."""

from __future__ import annotations

import csv
import random
import socket
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and clusters the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
