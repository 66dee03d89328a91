"""Fixtures for tracking tests: an isolated work dir, real `mlflow server` processes, a scratch PostgreSQL database."""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from testutils import free_port



class MlflowServer:
    """One `mlflow server` subprocess (its own process group, so the uvicorn child dies with it)."""

    def __init__(self, backend_store_uri: str, artifacts_destination: Path, log_path: Path, port: Optional[int] = None):
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = Path(artifacts_destination)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> "MlflowServer":
        """Start and wait until /health answers (a busy 2-core machine can take more than a minute)."""
        self.artifacts_destination.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: fewer processes, faster start
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            # Artifacts go through the server (mlflow-artifacts:/ proxied to the destination folder),
            # as on a cluster where workers share no disk with the server.
            "--serve-artifacts",
            "--artifacts-destination", str(self.artifacts_destination),
            "--default-artifact-root", "mlflow-artifacts:/",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            log_file.close()
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server at {self.url} not healthy after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the server and its uvicorn worker."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        elif self.proc is not None:
            self._signal_group(signal.SIGKILL)  # a leftover child of an exited parent

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture(scope="session")
def migrated_sqlite_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema created once (migrations take seconds on a small machine)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_home(tmp_path, monkeypatch, migrated_sqlite_db) -> Path:
    """LORAFLEET_HOME in tmp_path, so the default sqlite store and artifacts live there (store pre-migrated).
    MLFLOW_TRACKING_URI would win over that default: unset here, as an earlier test's
    ``mlflow.set_tracking_uri`` leaves it set in the session."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(migrated_sqlite_db, home / "mlflow.db")
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture
def mlflow_server(tmp_path):
    """Factory: ``mlflow_server(backend_store_uri=None, port=None)`` starts a server (sqlite in tmp_path by default)."""
    servers: list[MlflowServer] = []

    def start(backend_store_uri: Optional[str] = None, port: Optional[int] = None) -> MlflowServer:
        index = len(servers)
        server = MlflowServer(
            backend_store_uri or f"sqlite:///{tmp_path}/server{index}.db",
            artifacts_destination=tmp_path / f"server{index}-artifacts",
            log_path=tmp_path / f"server{index}.log",
            port=port,
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()  # throwaway state: no need to wait for a graceful shutdown


def _make_adapter(folder: Path, seed: int) -> Path:
    """A stand-in PEFT adapter folder (config + binary weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(f'{{"r": 8, "lora_alpha": 16, "seed": {seed}}}')
    (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(seed).bytes(4096))
    return folder


def _same_tree(a: Path, b: Path) -> bool:
    """Same relative file names with byte-identical contents."""
    files_a = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(Path(a) / f, Path(b) / f, shallow=False) for f in files_a)


@pytest.fixture
def make_adapter():
    return _make_adapter


@pytest.fixture
def same_tree():
    return _same_tree
