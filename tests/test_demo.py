"""`make demo` end to end (its `--quick` sizes): the whole story in one command, checked from
what it leaves behind: two tenants' adapters trained by Ray Train and registered in MLflow, a
sweep whose best version is registered, the server answering each tenant with its own adapter
and refusing the other's, a hot-swap under live traffic with zero failures, result files and
loss curves where the summary says, and no process left running. It runs as a subprocess with
its own Ray (the demo's `ray.init(address="local")`), as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, str]:
    work = tmp_path_factory.mktemp("demo") / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LORAFLEET_HOME", "MLFLOW_TRACKING_URI", "LORAFLEET_ADMIN_KEY")}
    proc = subprocess.run([sys.executable, "-m", "lorafleet.demo", "--work", str(work), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    return work, json.loads((work / "summary.json").read_text()), proc.stdout


def test_every_stage_reports_progress_and_the_summary_says_where_to_look(demo):
    work, summary, stdout = demo
    for n in range(1, 9):
        assert f"=== [{n}/8]" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout and "Nothing is left running." in stdout
    for adapter in summary["adapters"].values():
        assert Path(adapter["result_json"]).is_file()
        assert Path(adapter["loss_curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(summary["sweep"]["result_json"]).is_file() and Path(summary["sweep"]["plot"]).is_file()
    assert summary["work"] == str(work) and (work / ".lorafleet-demo").is_file()


def test_two_tenants_adapters_and_the_sweeps_best_are_registered(demo):
    from mlflow import MlflowClient

    _, summary, _ = demo
    uri = summary["mlflow_tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    intent = sorted(int(v.version) for v in client.search_model_versions("name='demo-intent'"))
    claims = sorted(int(v.version) for v in client.search_model_versions("name='demo-claims'"))
    assert intent == [1, 2] and claims == [1]
    best = summary["sweep"]["best"]
    assert (best["registered_model"], str(best["registered_version"])) == ("demo-intent", "2")
    v2 = client.get_model_version("demo-intent", "2")
    assert v2.tags["sweep"] == "demo-intent-sweep" and "hp.lora.r" in v2.tags
    assert len(summary["sweep"]["trials"]) == 2
    for adapter in summary["adapters"].values():
        assert adapter["validation"]["world_size"] == 2  # FSDP2 over 2 Ray Train workers


def test_each_tenant_is_served_its_own_task_and_isolated(demo):
    _, summary, _ = demo
    served = summary["served"]
    for tenant in ("acme", "globex"):
        assert served[tenant]["accuracy"] >= served[tenant]["base_accuracy"] + 0.3, served
        assert served[tenant]["examples"] >= 30
    assert served["isolation"] == "ok"  # 404 for the other's adapter, 403 to manage it, 401 without a key


def test_hot_swap_under_traffic_loses_no_request_and_nothing_is_left_running(demo):
    _, summary, _ = demo
    swap = summary["hot_swap"]
    assert swap["failed"] == 0 and (swap["from_version"], swap["to_version"]) == (1, 2)
    assert swap["by_version"]["1"] > 0 and swap["by_version"]["2"] >= 20
    assert swap["requests"] == sum(swap["by_version"].values())
    assert summary["left_running"] == []
