"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``: a head and a worker node, 1 CPU
and a node label each), and the worker node lost: its raylet and everything on it killed
(``remove_node(allow_graceful=False)``), then a node added back.

- Training: a fine-tune (``jobs/finetune.py``, a driver joined to the cluster as under ``ray job
  submit``) with 2 workers placed ``SPREAD``, one per node, loses the worker node after its
  first checkpoints; once a node is back the run resumes from the newest complete checkpoint,
  redoing at most one checkpoint interval, finishes and registers the adapter.
- Serving: ``lorafleet serve`` joined to the cluster with 2 engine replicas, at most one per node,
  under load from two tenants: when the worker node dies the head's replica keeps answering; only
  requests in flight on the dead node, or sent to its replica in the seconds before Serve sees it
  gone, fail (fast, with an error); once a node is back Serve starts a replacement replica there,
  which answers every tenant's adapter from the registry without any re-registration.

Each scenario takes minutes and records a row of the reliability report: `make test` skips them
unless LORAFLEET_RELIABILITY=1 (`make reliability` sets it). The fast checks at the end (the
SPREAD and one-replica-per-node options reach Ray) run everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

# Gated per test (reliability_only), not per module: the option checks at the end always run.
from testutils import REPO, banking_rows, free_port, record_scenario, registered_steps, reliability_only, write_rows

FINETUNE_CONFIG = REPO / "jobs" / "configs" / "banking77-lora.yaml"
ADMIN_KEY = "node-loss-admin-key-4b7d1e"
NODE_LABEL = "lorafleet-test-node"


def _routable_ip() -> str:
    """The address Ray gives a node of this machine by default (its route out), found without Ray.

    Drivers turn a 127.0.0.1 RAY_ADDRESS into this address, and a node started on 127.0.0.1 does
    not listen there; an address given explicitly also keeps the cluster off the loopback address a
    Ray already started by this test process uses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _ray_processes(node, marker: str) -> list[psutil.Process]:
    """Processes of one Ray node (children of its raylet) whose command line contains ``marker``."""
    try:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        children = raylet.children(recursive=True)
    except (psutil.Error, KeyError, IndexError):
        return []
    found = []
    for p in children:
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


class TwoNodes:
    """A head and a worker node of 1 CPU each, labelled ``lorafleet-test-node: head|worker``.

    The test process only starts and kills nodes; the code under test runs in drivers of its own
    (``env`` has RAY_ADDRESS), as on a real cluster. Token authentication is off for this
    throw-away cluster (a token left in ~/.ray by another local Ray would otherwise be used)."""

    def __init__(self, monkeypatch):
        from ray.cluster_utils import Cluster

        # Inherited by every process of the nodes (raylets, workers, Serve's proxies).
        for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
                     # Serve's proxy routes to replicas on its own node first: with one replica per node,
                     # each proxy would only ever reach its own node's replica.
                     "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}.items():
            monkeypatch.setenv(k, v)
        self.ip = _routable_ip()
        started = time.monotonic()
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=self._args("head"))
        self.head = self.cluster.head_node
        self.worker = self.cluster.add_node(**self._args("worker"))
        self.cluster.wait_for_nodes()
        self.startup_s = time.monotonic() - started
        self.env = {**os.environ, "RAY_ADDRESS": self.cluster.address}

    def _args(self, role: str) -> dict:
        return {"num_cpus": 1, "node_ip_address": self.ip, "labels": {NODE_LABEL: role}, "include_dashboard": False}

    def kill_worker(self) -> tuple[float, float]:
        """Kill the worker node's raylet and every process on it, no graceful shutdown (about a
        second: Ray kills them one by one and waits); when it began and when it was done."""
        node = self.worker
        self.worker = None
        began = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)
        return began, time.monotonic()

    def add_worker(self) -> float:
        self.worker = self.cluster.add_node(**self._args("worker"))
        return time.monotonic()

    def processes(self, role: str, marker: str) -> list[psutil.Process]:
        node = self.head if role == "head" else self.worker
        return _ray_processes(node, marker) if node is not None else []

    def close(self) -> None:
        # Node by node: Cluster.shutdown() also resets the internal KV of this process's own Ray
        # connection, which a session-wide Ray of the suite may still need.
        for node in [*self.cluster.worker_nodes, self.head]:
            try:
                self.cluster.remove_node(node, allow_graceful=True)
            except Exception as exc:  # noqa: BLE001 - teardown
                print(f"removing a test node: {exc!r}")


@pytest.fixture
def two_nodes(monkeypatch):
    nodes = TwoNodes(monkeypatch)
    try:
        yield nodes
    finally:
        nodes.close()


# --------------------------------------------------------------------------- training

EVERY, TOTAL = 5, 30
NODE_LOST_S = 10  # how long the run is a node short before one is added back


@pytest.mark.slow
@reliability_only
def test_training_survives_the_loss_of_a_node(two_nodes, tmp_path):
    from train.tiny_models import save_tiny_base

    base = save_tiny_base(tmp_path / "base")
    data = write_rows(tmp_path / "bank.csv", banking_rows(300, seed=5))
    out, home = tmp_path / "out", tmp_path / "home"
    # Short sequences keep each step well under a second on 2 cores: the random tiny base's tokenizer
    # splits banking77 queries finely, so only the shorter ones (49 of 240) stay, enough for 30 steps.
    sets = [f"model.name_or_path={base}", f"data.path={data}", f"output_dir={out}", "run_name=node-loss",
            f"training.max_steps={TOTAL}", "training.per_device_batch_size=8", "training.max_seq_length=64", "training.logging_steps=1",
            "training.generation_metrics=false", "lora.r=8", "lora.lora_alpha=16", f"checkpoint.every_n_steps={EVERY}",
            "checkpoint.keep=3", "checkpoint.max_failures=3", "distributed.placement_strategy=SPREAD",
            "tracking.experiment_name=node-loss", "tracking.register_as=node-loss-intent"]
    cmd = [sys.executable, "jobs/finetune.py", "--config", str(FINETUNE_CONFIG)] + [a for s in sets for a in ("--set", s)]
    env = {**two_nodes.env, "LORAFLEET_HOME": str(home)}
    run_dir = home / "ray_results" / "node-loss"
    log_path = tmp_path / "driver.log"
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    printed: list[int] = []  # "step N/M" lines rank 0 logged, streamed to the driver (log_to_driver)
    seen: dict = {}

    def read_driver():
        with log_path.open("w") as log:
            for line in driver.stdout:
                log.write(line)
                m = re.search(r"\bstep (\d+)/\d+", line)
                if m:
                    printed.append(int(m.group(1)))

    reader = threading.Thread(target=read_driver, daemon=True)
    reader.start()
    try:
        # The first complete checkpoint is in and rank 0 is past it, with one worker on each node.
        deadline = time.monotonic() + 600
        while not (registered_steps(run_dir) and printed and printed[-1] > EVERY * 2):
            assert driver.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never got past its second checkpoint"
            time.sleep(0.05)
        seen["workers_per_node"] = {role: len(two_nodes.processes(role, "RayTrainWorker")) for role in ("head", "worker")}
        killed_at, _ = two_nodes.kill_worker()
        checkpoint_at_kill = max(registered_steps(run_dir))
        time.sleep(2)  # progress lines already on their way to the driver; no step completes without the lost rank
        seen.update(killed_at_step=printed[-1], checkpoint_at_kill=checkpoint_at_kill)
        # Lost for a while: the run waits for resources (it has a node short), then a node comes back.
        time.sleep(NODE_LOST_S)
        seen["alive_while_node_lost"] = driver.poll() is None
        added_at = two_nodes.add_worker()
        deadline = time.monotonic() + 300
        while not two_nodes.processes("worker", "RayTrainWorker"):
            assert driver.poll() is None or driver.returncode == 0, log_path.read_text()[-4000:]
            if driver.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        seen["worker_back_on_new_node_s"] = round(time.monotonic() - added_at, 1) if two_nodes.processes("worker", "RayTrainWorker") else None
        driver.wait(timeout=900)
        reader.join(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, log_path.read_text()[-6000:]
    res = json.loads((out / "result.json").read_text())
    total_s = time.monotonic() - killed_at
    print(f"\nnode loss during training: {seen}, resumed from {res['resumed_from_step']}, final step {res['metrics']['step']}")
    # SPREAD over two 1-CPU nodes: one worker on each, so the lost node held one of them.
    assert seen["workers_per_node"] == {"head": 1, "worker": 1}, seen
    assert seen["alive_while_node_lost"], "the run gave up while the node was lost"
    assert seen["worker_back_on_new_node_s"] is not None, "no training worker started on the node added back"
    # Resumed from the newest complete checkpoint (the last registered at the kill, or one every rank
    # had written by then), so at most one interval was redone; then finished and registered.
    assert res["resumed_from_step"] == res["metrics"]["resumed_from_step"]
    assert seen["checkpoint_at_kill"] <= res["resumed_from_step"] <= seen["killed_at_step"], (res["resumed_from_step"], seen)
    redone = seen["killed_at_step"] - res["resumed_from_step"]
    assert 0 <= redone <= EVERY, (redone, seen)
    assert res["metrics"]["step"] == TOTAL
    assert res["registered_model"] == "node-loss-intent" and res["registered_version"] == "1", res
    assert (Path(res["adapter_path"]) / "adapter_model.safetensors").is_file()
    record_scenario("training", "lose a Ray node (2 nodes, workers SPREAD)",
                    load=f"{TOTAL} steps, 2 workers FSDP2 SPREAD over 2 nodes (1 each), checkpoint every {EVERY}",
                    faults=f"worker node's raylet and processes killed at step {seen['killed_at_step']}; node added back {NODE_LOST_S} s later",
                    lost=f"{redone} step(s), redone",
                    outcome=f"waited for the node, resumed from step {res['resumed_from_step']} (checkpoint {seen['checkpoint_at_kill']} "
                            f"registered at the kill), finished step {res['metrics']['step']}, registered "
                            f"{res['registered_model']} v{res['registered_version']}",
                    killed_at_step=seen["killed_at_step"], checkpoint_at_kill=seen["checkpoint_at_kill"],
                    resumed_from_step=res["resumed_from_step"], final_step=res["metrics"]["step"], steps_redone=redone,
                    worker_back_on_new_node_s=seen["worker_back_on_new_node_s"], kill_to_finish_s=round(total_s, 1),
                    cluster_startup_s=round(two_nodes.startup_s, 1))


# --------------------------------------------------------------------------- serving

TENANT_ADAPTERS = {"acme": "alpha", "globex": "beta"}  # tenant -> its adapter (serve_helpers.TARGETS phrase)
CLIENTS = 6
UNAWARE_S = 6.0  # bound on how long after the kill Serve's router may still send a request to the lost replica
MAX_TOKENS = 12


@pytest.fixture
def serve_assets(tmp_path):
    """A tiny base and one decisive adapter per tenant (tests/serve/serve_helpers), with the text
    PEFT + Transformers answer for one prompt, to check that the right adapter answered."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "serve"))
    from serve_helpers import PROMPT_SUFFIX, TARGETS, offline_greedy, train_adapter, train_base
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = [r["text"] for r in banking_rows(4000, seed=3)]
        base = tmp_path / "assets" / "base"
        train_base(base, lines, steps=150)
        adapters = {}
        for i, name in enumerate(TENANT_ADAPTERS.values()):
            adapters[name] = tmp_path / "assets" / "adapters" / name
            train_adapter(base, adapters[name], TARGETS[name], lines[:400], seed=i)
        prompt = lines[1000] + PROMPT_SUFFIX
        tok = AutoTokenizer.from_pretrained(base)
        expected = {n: tok.decode(offline_greedy(base, p, [prompt])[prompt], skip_special_tokens=True) for n, p in adapters.items()}
    finally:
        torch.set_num_threads(threads)
    return {"root": tmp_path / "assets", "base": base, "adapters": adapters, "prompt": prompt, "expected": expected}


def _start_server(two_nodes: TwoNodes, assets: dict, work: Path) -> tuple[subprocess.Popen, str, Path]:
    """`lorafleet serve` joined to the cluster: 2 engine replicas, at most one per node."""
    port = free_port()
    cfg = {
        "model": str(assets["base"]), "served_model_name": "base", "host": "127.0.0.1", "port": port,
        "engine": {"max_model_len": 256, "max_num_seqs": 8, "max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 4,
                   "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 128 * 2**20},
        "deployment": {"num_replicas": 2, "num_cpus": 1, "max_replicas_per_node": 1, "max_ongoing_requests": 8,
                       "health_check_period_s": 2, "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}},
        "allowed_local_roots": [str(assets["root"])],
        "adapter_cache_dir": str(work / "adapter-cache"),
        "limits": {"max_queued_requests": 16, "max_tokens": 64},
        "tenancy": {"state_dir": str(work / "state"), "allow_anonymous": False, "poll_interval_s": 0.5},
    }
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = work / "serve.log"
    env = {**two_nodes.env, "LORAFLEET_HOME": str(work / "home"), "LORAFLEET_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lorafleet")), "serve", "--config", str(path)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the server never became ready: " + log.read_text()[-4000:]
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # deletes the app; the cluster is the fixture's
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
@reliability_only
def test_serving_survives_the_loss_of_a_node_and_the_replacement_serves_every_tenant(two_nodes, serve_assets, tmp_path):
    proc, url, log = _start_server(two_nodes, serve_assets, tmp_path)
    try:
        _serving_scenario(two_nodes, serve_assets, url)
    except BaseException:
        print(log.read_text()[-6000:])
        raise
    finally:
        _stop_server(proc)


def _serving_scenario(two_nodes: TwoNodes, assets: dict, url: str) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for tenant, adapter in TENANT_ADAPTERS.items():
            r = http.post("/admin/tenants", headers=admin, json={"name": tenant})
            assert r.status_code == 201, r.text
            keys[tenant] = {"Authorization": f"Bearer {r.json()['api_key']['key']}"}
            r = http.post("/v1/adapters", headers=keys[tenant], json={"name": adapter, "source": str(assets["adapters"][adapter])})
            assert r.status_code == 201, r.text
    replicas_per_node = {role: len(two_nodes.processes(role, "ServeReplica:")) for role in ("head", "worker")}
    assert replicas_per_node == {"head": 1, "worker": 1}, replicas_per_node
    prompt, expected = assets["prompt"], assets["expected"]

    async def call(client: httpx.AsyncClient, tenant: str) -> tuple:
        """(status, text or error, answering replica) of one greedy completion of the tenant's adapter."""
        body = {"model": TENANT_ADAPTERS[tenant], "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        try:
            r = await client.post("/v1/completions", headers=keys[tenant], json=body)
        except httpx.HTTPError as exc:
            return 0, repr(exc), None
        if r.status_code != 200:
            return r.status_code, r.text[:300], None
        return 200, r.json()["choices"][0]["text"], r.headers.get("x-lorafleet-replica")

    results: list[tuple] = []  # (sent, done, tenant, status, text, replica)
    kill: dict = {}

    async def load():
        limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            stop = asyncio.Event()

            async def worker(i: int):
                tenant = list(TENANT_ADAPTERS)[i % len(TENANT_ADAPTERS)]
                while not stop.is_set():
                    sent = time.monotonic()
                    out = await call(client, tenant)
                    results.append((sent, time.monotonic(), tenant, *out))

            async def killer():
                started = time.monotonic()
                # Both replicas answering, for a few seconds, before the worker node goes.
                while time.monotonic() - started < 5 or len({r[5] for r in results if r[5]}) < 2:
                    assert time.monotonic() - started < 120, Counter(r[5] for r in results)
                    await asyncio.sleep(0.2)
                kill["at"] = await asyncio.to_thread(two_nodes.kill_worker)
                await asyncio.sleep(20)  # the load goes on with one node
                stop.set()

            await asyncio.gather(killer(), *[worker(i) for i in range(CLIENTS)])

    asyncio.run(load())
    began, at = kill["at"]
    before = Counter(r[5] for r in results if r[1] < began and r[5])
    after = Counter(r[5] for r in results if r[0] > at and r[5])
    failed = [r for r in results if r[3] != 200]
    in_flight = [r for r in results if r[0] < at and r[1] > began]
    wrong = [r for r in results if r[3] == 200 and r[4] != expected[TENANT_ADAPTERS[r[2]]]]
    print(f"\nbefore the kill {dict(before)}, after {dict(after)}; {len(results)} requests, {len(in_flight)} in flight at the kill "
          f"({at - began:.2f} s), failed (sent, done, status, error; s after the kill began) "
          f"{[(round(r[0] - began, 2), round(r[1] - began, 2), r[3], r[4][:80]) for r in failed]}")
    assert len(before) == 2, before  # both replicas answered before the kill
    assert not wrong, wrong[:3]
    (survivor,) = set(after)  # only the head's replica answers after the kill
    lost = set(before) - {survivor}
    # What may fail: requests in flight at the kill (through the dead node's proxy or on its replica), and
    # requests the head's proxy sent to the dead replica before Serve saw it gone (seconds). Each fails
    # fast (an error, not a hang); once Serve has seen the node go, nothing fails.
    late = [r for r in failed if r[0] > began + UNAWARE_S]
    assert not late, [(round(r[0] - began, 2), r[3], r[4][:200]) for r in late]
    assert all(r[1] - began < UNAWARE_S * 2 for r in failed), [(round(r[1] - began, 2), r[3]) for r in failed]
    sent_after_kill_failed = [r for r in failed if r[0] > at]
    unaware_s = max([r[0] - began for r in sent_after_kill_failed], default=0.0)
    served_after = sum(after.values())
    assert served_after > 0

    # A node comes back: Serve starts a replacement replica on it, which serves every tenant's adapter
    # from the registry (fetched and hash-checked by the replica itself); nothing is registered again.
    added_at = two_nodes.add_worker()
    deadline = time.monotonic() + 300
    while not two_nodes.processes("worker", "ServeReplica:"):
        assert time.monotonic() < deadline, "Serve started no replica on the node added back"
        time.sleep(1)
    landed: dict[str, int] = {}
    new_replica = None
    with httpx.Client(base_url=url, timeout=120) as http:
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready again"
            time.sleep(1)
        replacement_s = time.monotonic() - added_at
        for tenant in TENANT_ADAPTERS:
            for attempt in range(1, 41):
                status, text, replica = asyncio.run(_one(url, keys[tenant], TENANT_ADAPTERS[tenant], prompt))
                assert status == 200, text
                assert text == expected[TENANT_ADAPTERS[tenant]], (tenant, text)
                if replica not in (survivor, *lost):
                    new_replica = new_replica or replica
                    assert replica == new_replica, (replica, new_replica)
                    landed[tenant] = attempt
                    break
        engines = http.get("/admin/engines", headers=admin).json()["replicas"]
        cards = {t: http.get(f"/v1/adapters/{a}", headers=keys[t]).json() for t, a in TENANT_ADAPTERS.items()}
    assert set(landed) == set(TENANT_ADAPTERS), f"requests per tenant to reach the new replica: {landed}"
    assert new_replica in engines and not lost & set(engines), (list(engines), lost)  # the dead one is no longer listed
    assert all(c["version"] == 1 for c in cards.values()), cards  # still the one registration of each
    record_scenario("serving", "lose a Ray node (2 nodes, one engine replica each)",
                    load=f"{CLIENTS} clients of 2 tenants, each on its own adapter, 20 s after the kill",
                    faults="worker node's raylet and processes (its engine replica and Serve proxy) killed under load; node added back",
                    lost=(f"{len(failed)} requests (errors within {max(r[1] for r in failed) - began:.1f} s, not hangs): "
                          f"{len(failed) - len(sent_after_kill_failed)} in flight at the kill, {len(sent_after_kill_failed)} sent up to "
                          f"{unaware_s:.1f} s after it (to the lost node's replica or proxy, before the loss was seen)" if failed
                          else f"nothing: none of the {len(in_flight)} requests in flight at the kill failed"),
                    outcome=f"{len(results)} requests, answers per replica before the kill {sorted(before.values())}, "
                            f"{served_after} answered by the head's replica after it; replacement ready {replacement_s:.0f} s after "
                            f"the node came back and answered both tenants' adapters (registered once, version 1) correctly",
                    requests=len(results), in_flight_at_kill=len(in_flight), failed=len(failed),
                    failed_sent_after_kill=len(sent_after_kill_failed), last_failed_sent_s_after_kill=round(unaware_s, 2),
                    served_after_kill=served_after,
                    replacement_ready_s=round(replacement_s, 1), requests_to_reach_new_replica=landed,
                    cluster_startup_s=round(two_nodes.startup_s, 1))


async def _one(url: str, headers: dict, model: str, prompt: str) -> tuple:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        r = await client.post("/v1/completions", headers=headers, json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        if r.status_code != 200:
            return r.status_code, r.text, None
        return 200, r.json()["choices"][0]["text"], r.headers.get("x-lorafleet-replica")


# --------------------------------------------------------------------------- the options (fast, no Ray started)


def test_spread_placement_reaches_ray_trains_scaling_config(tmp_path):
    from lorafleet.config import FinetuneConfig
    from lorafleet.config.base import ConfigError, load_config
    from lorafleet.train.trainer import build_trainer

    cfg = load_config(FinetuneConfig, FINETUNE_CONFIG, [f"output_dir={tmp_path}", "distributed.placement_strategy=SPREAD"])
    scaling = build_trainer(cfg, None).scaling_config
    assert (scaling.num_workers, scaling.placement_strategy) == (2, "SPREAD")
    with pytest.raises((ConfigError, ValueError), match="placement_strategy"):
        load_config(FinetuneConfig, FINETUNE_CONFIG, ["distributed.placement_strategy=SCATTER"])


def test_one_replica_per_node_reaches_serves_deployment_options():
    from lorafleet.serve.app import deployment_options
    from lorafleet.serve.config import ServeConfig

    cfg = ServeConfig(model="unused", deployment={"num_replicas": 2, "max_replicas_per_node": 1})
    assert deployment_options(cfg)["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in deployment_options(ServeConfig(model="unused"))
    with pytest.raises(ValueError, match="max_replicas_per_node"):
        ServeConfig(model="unused", deployment={"num_replicas": 2, "max_replicas_per_node": 0})
