"""The cluster entry point for real: a Ray cluster started with `ray start --head` (its own temp
dir and ports, so it cannot touch the session's Ray), `jobs/finetune.py` submitted with
`ray job submit --working-dir . --runtime-env-json ...` exactly as README and cluster.yaml say,
and the adapter the job registered checked in MLflow, after the job's driver was killed and the
same command re-submitted (one job run covers both: this is one of the suite's slowest tests). The cluster is stopped afterwards by
signalling its `ray start --block` process, never with `ray stop` (which would stop every Ray on
the machine)."""

from __future__ import annotations

import json
import os
import re
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


class HeadNode:
    """`ray start --head --block` with its own temp dir and ports, in the given environment."""

    def __init__(self, env: dict[str, str]):
        self.temp = tempfile.mkdtemp(prefix="lfjob-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
        bindir = str(Path(sys.executable).parent)
        self.env = {**env, "PATH": bindir + os.pathsep + env.get("PATH", ""), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        dashboard = free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        cmd = [str(Path(bindir) / "ray"), "start", "--head", "--block", "--temp-dir", self.temp, "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--num-cpus", "4", "--include-dashboard", "true"]
        self.log = open(Path(self.temp) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_for_dashboard()
        except BaseException:
            self.stop()
            raise

    def _wait_for_dashboard(self) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, (Path(self.temp) / "ray-start.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.address}/api/version", timeout=5).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard of `ray start --head` did not come up in 180 s"
            time.sleep(1)

    def ray(self, *args: str, cwd=REPO, timeout: float = 900) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster (`ray job submit ...` gets --address put in)."""
        cmd = [str(Path(sys.executable).with_name("ray")), *args[:2], "--address", self.address, *args[2:]]
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """Like `ray stop` for this cluster only: signal its `ray start --block`, then remove its temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        deadline = time.monotonic() + 30
        while _ray_processes(self.temp) and time.monotonic() < deadline:
            time.sleep(1)
        left = _ray_processes(self.temp)
        shutil.rmtree(self.temp, ignore_errors=True)
        assert not left, f"the test's Ray cluster left processes behind: {left}"


def _driver_pid(temp: str) -> int | None:
    """The `python jobs/finetune.py` driver a job of the cluster in ``temp`` runs (in Ray's copy of the upload)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if any(c.endswith("jobs/finetune.py") for c in p.info["cmdline"] or []) and (p.info["cwd"] or "").startswith(temp):
            return p.info["pid"]
    return None


def _registered_step(run_dir: Path) -> int | None:
    """Step of the newest checkpoint Ray Train has *registered* for the run (its controller's
    checkpoint_manager_snapshot.json, Ray 2.60): what a re-run of the run name restores from."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def test_ray_job_submit_keeps_what_it_makes_and_resumes_after_a_driver_crash(tiny_base, tmp_path):
    """The README's recipe with no output paths at all, on a cluster whose HOME is a tmp dir and
    with no LORAFLEET_HOME: the MLflow store, registered version, checkpoints and adapter land in
    ~/lorafleet-work (not in Ray's copy of the upload, which `ray stop` takes away); the driver is
    SIGKILLed once Ray Train has registered a checkpoint, a file in the folder changes (so the
    upload's copy moves), and the same command submitted again resumes from that checkpoint.
    Everything is checked again after the cluster is stopped."""
    import secrets

    from mlflow import MlflowClient

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFLEET_HOME", "MLFLOW_TRACKING_URI")}
    env["HOME"] = str(home)
    project = tmp_path / "project"  # the user's folder: the job scripts and configs, and the data beside them
    shutil.copytree(REPO / "jobs", project / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data").mkdir()
    write_rows(project / "data" / "banking.csv", banking_rows(240, seed=12))
    work = home / "lorafleet-work"
    run_dir = work / "ray_results" / "banking77-lora"

    submit = ["job", "submit", "--working-dir", ".",
              "--runtime-env-json", json.dumps({"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}})]
    job = ["python", "jobs/finetune.py", "--config", "jobs/configs/banking77-lora.yaml",
           "--set", f"model.name_or_path={tiny_base}", "--set", "data.path=data/banking.csv",  # an input in the upload: relative is right
           "--set", "lora.r=8", "--set", "lora.lora_alpha=16", "--set", "training.max_steps=16",
           "--set", "training.per_device_batch_size=4", "--set", "training.logging_steps=2",
           "--set", "checkpoint.every_n_steps=2", "--set", "data.max_eval_samples=8"]
    head = HeadNode(env)
    try:
        first = head.ray(*submit, "--no-wait", "--submission-id", "crash-1", "--", *job, cwd=project, timeout=300)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        deadline, pid = time.monotonic() + 600, None
        while (killed_at := _registered_step(run_dir)) is None:
            pid = _driver_pid(head.temp) or pid
            if time.monotonic() > deadline or (pid and not Path(f"/proc/{pid}").exists()):
                logs = head.ray("job", "logs", "crash-1", timeout=120)
                pytest.fail(f"no registered checkpoint in {run_dir} while the first job ran:\n{logs.stdout[-5000:]}")
            time.sleep(0.2)
        pid = _driver_pid(head.temp)
        assert pid, "the first job's driver was not found"
        os.kill(pid, signal.SIGKILL)  # a driver crash, after Ray Train registered a checkpoint
        for _ in range(60):  # the CLI prints e.g. "Job 'crash-1' failed" once the job has ended
            status = head.ray("job", "status", "crash-1", timeout=120).stdout
            if ended := re.search(r"Job 'crash-1' (failed|succeeded|stopped)", status):
                break
            time.sleep(2)
        assert ended and ended.group(1) == "failed" and "exit code 137" in status, status[-2000:]  # it died mid-run
        # nothing went into Ray's session dir; the store is already where the user looks
        assert not [str(p) for p in Path(head.temp).rglob("*") if p.name in ("mlflow.db", "lorafleet-work", "mlartifacts")]
        assert (work / "mlflow.db").is_file()

        # an edit in the folder: the same command uploads a new package, so Ray unpacks a new copy (_ray_pkg_<hash>)
        (project / "NOTES.md").write_text("edited between the two submissions\n")
        second = head.ray(*submit, "--submission-id", "crash-2", "--", *job, cwd=project)
        logs = second.stdout[-8000:] + second.stderr[-3000:]
        assert second.returncode == 0 and "succeeded" in second.stdout.lower(), logs
        # the job said where everything goes, and why there
        assert f"outputs: {work}/outputs/banking77-lora" in second.stdout and f"checkpoints: {work}/ray_results/banking77-lora" in second.stdout, logs
        assert "lorafleet work dir" in second.stdout and "LORAFLEET_HOME" in second.stdout, logs

        listed = subprocess.run([str(Path(sys.executable).with_name("lorafleet")), "adapters", "list", "--json"], cwd=tmp_path,
                                env={**env, "LORAFLEET_HOME": str(work)}, capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0, listed.stderr[-3000:]
        assert [(r["name"], str(r["version"])) for r in json.loads(listed.stdout)] == [("banking77-intent", "1")], listed.stdout
        # the cluster lists the crashed job as failed and the re-submission as finished
        jobs = head.ray("job", "list", timeout=120)
        assert jobs.returncode == 0 and "SUCCEEDED" in jobs.stdout and "FAILED" in jobs.stdout, jobs.stdout[-2000:] + jobs.stderr[-2000:]
    finally:
        head.stop()  # `ray stop` for this cluster: Ray's session dir, and the copy of the upload, are gone

    result = json.loads((work / "outputs" / "banking77-lora" / "result.json").read_text())
    assert result["resumed_from_step"] is not None and killed_at <= result["resumed_from_step"] < 16, (killed_at, result["resumed_from_step"])
    assert result["metrics"]["step"] == result["metrics"]["steps_total"] == 16, result["metrics"]
    assert result["metrics"]["world_size"] == 2  # the config's FSDP workers, placed by the cluster
    assert result["registered_model"] == "banking77-intent" and result["registered_version"] == "1"
    assert Path(result["adapter_path"]) == work / "outputs" / "banking77-lora" / "adapter"
    assert (work / "outputs" / "banking77-lora" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert _registered_step(run_dir) == 16 and list(run_dir.glob("checkpoint_*/dcp"))  # the checkpoints a re-run resumes from

    uri = f"sqlite:///{work}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='banking77-intent'")
    assert version.run_id == result["mlflow_run_id"] and client.get_run(version.run_id).info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name("banking77").experiment_id], "tags.`mlflow.runName` = 'banking77-lora'")
    assert [r.info.run_id for r in runs] == [version.run_id]  # the resumed job carried on the killed job's MLflow run
    local = client.download_artifacts(version.run_id, "adapter", str(tmp_path / "downloaded"))
    assert json.loads((Path(local) / "adapter_config.json").read_text())["r"] == 8
    assert (Path(local) / "adapter_model.safetensors").stat().st_size > 0
    assert version.tags["task"] == "banking77"
