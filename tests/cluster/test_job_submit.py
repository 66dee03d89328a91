"""The cluster entry point for real: a Ray cluster started with `ray start --head` (its own temp
dir and ports, so it cannot touch the session's Ray), `jobs/finetune.py` submitted with
`ray job submit --working-dir . --runtime-env-json ...` exactly as README and cluster.yaml say,
and the adapter the job registered checked in MLflow. The cluster is stopped afterwards by
signalling its `ray start --block` process, never with `ray stop` (which would stop every Ray on
the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from testutils import banking_rows, free_port, write_rows

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _ray_processes(marker: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd:
            found.append(f"{p.info['pid']} {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` in the venv's environment: yields (dashboard address, env for clients)."""
    temp = tempfile.mkdtemp(prefix="lfjob-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    cmd = [str(Path(bindir) / "ray"), "start", "--head", "--block", "--temp-dir", temp, "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()), "--num-cpus", "4", "--include-dashboard", "true"]
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (Path(temp) / "ray-start.log").read_text()[-3000:]
            try:
                if httpx.get(f"{address}/api/version", timeout=5).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard of `ray start --head` did not come up in 180 s"
            time.sleep(1)
        yield address, env, temp
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        deadline = time.monotonic() + 30
        while _ray_processes(temp) and time.monotonic() < deadline:
            time.sleep(1)
        left = _ray_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"the test's Ray cluster left processes behind: {left}"


def test_ray_job_submit_finetune_registers_an_adapter(head_node, tiny_base, tmp_path):
    from mlflow import MlflowClient

    address, env, _ = head_node
    data = write_rows(tmp_path / "banking.csv", banking_rows(240, seed=11))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    runtime_env = {"env_vars": {"LORAFLEET_HOME": str(tmp_path / "home"), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}}
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/finetune.py", "--config", "jobs/configs/banking77-lora.yaml",
           "--set", f"model.name_or_path={tiny_base}", "--set", f"data.path={data}", "--set", "run_name=job-submit",
           "--set", "lora.r=8", "--set", "lora.lora_alpha=16", "--set", "training.num_epochs=1", "--set", "data.max_eval_samples=16",
           "--set", "checkpoint.every_n_steps=5", "--set", f"checkpoint.storage_path={tmp_path / 'ray_results'}",
           "--set", f"tracking.mlflow_tracking_uri={uri}", "--set", "tracking.register_as=job-submit-intent",
           "--set", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, logs
    assert "succeeded" in proc.stdout.lower(), logs

    # the job's own report, written where the config said, by the code that ran on the cluster
    result = json.loads((out / "result.json").read_text())
    assert result["registered_model"] == "job-submit-intent" and result["metrics"]["world_size"] == 2
    # frequent checkpoints went to the storage path the config named (shared storage on a real cluster)
    assert list((tmp_path / "ray_results").glob("*/checkpoint_*")), sorted(p.name for p in (tmp_path / "ray_results").rglob("*"))[:20]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='job-submit-intent'")
    assert version.run_id == result["mlflow_run_id"] and version.tags["task"] == "banking77"
    assert client.get_run(version.run_id).info.status == "FINISHED"
    local = client.download_artifacts(version.run_id, "adapter", str(tmp_path / "downloaded"))
    config = json.loads((Path(local) / "adapter_config.json").read_text())
    assert config["r"] == 8 and (Path(local) / "adapter_model.safetensors").stat().st_size > 0

    # the cluster lists the job as finished
    listed = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list", "--address", address],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]
