"""What a run records about where it came from: the git commit and the dataset fingerprint."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Optional

GIT_COMMIT_TAG = "lorafleet.git_commit"
DATASET_FINGERPRINT_TAG = "lorafleet.dataset_fingerprint"



def git_commit(path: Optional[str] = None) -> Optional[str]:
    """Commit hash (HEAD) of the git repo containing ``path``; None if not a git repo or git is missing.

    ``path`` defaults to the lorafleet source tree, then the working directory.
    """
    candidates = [path] if path else [str(Path(__file__).resolve().parent), os.getcwd()]
    for candidate in candidates:
        try:
            out = subprocess.run(
                ["git", "-C", candidate, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        commit = out.stdout.strip()
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit):
            return commit
    return None


def dataset_fingerprint_tag(fingerprint: str) -> dict[str, str]:
    """Run/version tags recording which data a run trained on."""
    return {DATASET_FINGERPRINT_TAG: str(fingerprint)}
