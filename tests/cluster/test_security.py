"""Security defaults of what the project starts: Ray clusters with token authentication and a
loopback-only dashboard (locally and in cluster.yaml), and no remote code unless configured."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from testutils import REPO, free_port, record_scenario

_START = """
import sys, time
from lorafleet.ray_local import start_local_ray
start_local_ray(1, dashboard_port=int(sys.argv[1]), include_dashboard=True)
print("up", flush=True)
time.sleep(600)
"""


def test_a_local_ray_the_project_starts_needs_the_token_and_listens_on_loopback_only(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO / "platform")
    proc = subprocess.Popen([sys.executable, "-c", _START, str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up" or proc.poll() is None
        url = f"http://127.0.0.1:{port}/api/jobs/"
        deadline = time.monotonic() + 120
        while True:
            try:
                anonymous = httpx.get(url, timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(1)
        assert anonymous.status_code in (401, 403), (anonymous.status_code, anonymous.text[:200])
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        authorised = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert authorised.status_code == 200, authorised.text[:200]
        listening = []
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                listening += [c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        dashboard = {a.ip for a in listening if a.port == port}
        assert dashboard == {"127.0.0.1"}, dashboard  # the dashboard and its job API: loopback only
        # Ray's gRPC servers (GCS, raylet, workers) bind every interface whatever the node address;
        # with token authentication on they refuse callers without the token (the first check).
        everywhere = sorted({a.port for a in listening if a.ip in ("0.0.0.0", "::")})
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    record_scenario("security", "a Ray cluster the project starts (lorafleet serve / finetune / demo)",
                    bad_inputs="dashboard job API called without the token; listening sockets inspected", lost="nothing",
                    outcome=f"{anonymous.status_code} without the token, 200 with it; the dashboard listens on 127.0.0.1 only; "
                            f"{len(everywhere)} Ray gRPC ports listen on all interfaces, token-protected (firewall them on shared hosts)")


def test_the_production_cluster_keeps_token_auth_and_a_private_dashboard():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
    assert "0.0.0.0" not in " ".join(ray_starts)
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node


def test_remote_code_is_off_unless_configured():
    from lorafleet.config.train import ModelConfig
    from lorafleet.serve.config import ServeConfig
    from lorafleet.serve.engine import engine_setup

    assert ModelConfig(name_or_path="x").trust_remote_code is False
    args = engine_setup(ServeConfig(model="/models/base"), device="cpu").args
    assert args.trust_remote_code is False
    record_scenario("security", "defaults: trust_remote_code, cluster token auth, dashboard host",
                    lost="nothing", outcome="trust_remote_code false for training and serving unless set; cluster.yaml starts Ray with "
                                            "RAY_AUTH_MODE=token on every node, the same token file, dashboard on 127.0.0.1")
