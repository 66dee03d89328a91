"""Servers and load for the serving benchmarks: the lorafleet server (`lorafleet serve`, its own
local Ray, as a user starts it) and vLLM's own OpenAI server (`python -m
vllm.entrypoints.openai.api_server`), started with the same engine settings, plus an async load
generator that replays one request stream at a fixed concurrency and measures each request
(streamed, so time to first token is seen)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import REPO, free_port, median, percentile, wait_http

# The engine settings both servers get (vLLM flag names; lorafleet's `engine` keys are the same words).
ENGINE = {"max_model_len": 512, "max_num_seqs": 16, "max_lora_rank": 8, "dtype": "float32", "enforce_eager": True,
          "kv_cache_memory_bytes": 512 * 2**20}


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    startup_s: float
    log: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # lorafleet serve: deletes the app, stops its Ray
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _popen(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def start_lorafleet(work: Path, base: Path, adapters: dict[str, Path], *, max_loras: int, max_cpu_loras: int, name: str = "lorafleet",
                    admin_key: str | None = None, engine: dict | None = None, sections: dict | None = None) -> Server:
    """`lorafleet serve --config <file>` with the adapters as shared config adapters (anonymous calls allowed).

    ``sections`` updates the config's sections key by key (e.g. ``{"deployment": {"num_replicas": 2}}``)."""
    port = free_port()
    state = work / f"{name}-state"
    cfg = {
        "model": str(base), "served_model_name": "base", "host": "127.0.0.1", "port": port,
        "engine": {**ENGINE, **(engine or {}), "max_loras": max_loras, "max_cpu_loras": max_cpu_loras},
        "deployment": {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 64},
        "adapters": [{"name": n, "source": str(p)} for n, p in adapters.items()],
        "allowed_local_roots": [str(work)],
        "adapter_cache_dir": str(work / f"{name}-adapter-cache"),
        "limits": {"max_queued_requests": 256, "max_tokens": 256},
        "tenancy": {"state_dir": str(state), "allow_anonymous": True, "quotas": {"max_adapters": 1000}},
    }
    for section, values in (sections or {}).items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) and isinstance(cfg.get(section), dict) else values
    path = work / f"{name}-serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LORAFLEET_HOME": str(work / "home")}
    env.pop("RAY_ADDRESS", None)
    if admin_key:
        env["LORAFLEET_ADMIN_KEY"] = admin_key
    log = work / "logs" / f"{name}.log"
    started = time.monotonic()
    proc = _popen([str(Path(sys.executable).with_name("lorafleet")), "serve", "--config", str(path)], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ready", 600, proc)
    except Exception:
        print(log.read_text()[-4000:], file=sys.stderr)
        Server(name, url, proc, 0, log).stop()
        raise
    return Server(name, url, proc, time.monotonic() - started, log)


def start_vllm(work: Path, base: Path, adapters: dict[str, Path], *, max_loras: int, max_cpu_loras: int, engine: dict | None = None) -> Server:
    """vLLM's own OpenAI server with the same engine settings and the same adapters (--lora-modules)."""
    port = free_port()
    e = {**ENGINE, **(engine or {})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras),
           "--max-lora-rank", str(e["max_lora_rank"]), "--max-model-len", str(e["max_model_len"]), "--max-num-seqs", str(e["max_num_seqs"]),
           "--dtype", e["dtype"], "--kv-cache-memory-bytes", str(e["kv_cache_memory_bytes"])]
    if e["enforce_eager"]:
        cmd.append("--enforce-eager")
    if adapters:
        cmd += ["--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
    log = work / "logs" / "vllm.log"
    started = time.monotonic()
    proc = _popen(cmd, log, dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 600, proc)
    except Exception:
        print(log.read_text()[-4000:], file=sys.stderr)
        Server("vllm", url, proc, 0, log).stop()
        raise
    return Server("vllm", url, proc, time.monotonic() - started, log)


@dataclass
class Result:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    versions: list = field(default_factory=list)
    wall_s: float = 0.0

    async def send(self, client, url: str, body: dict, headers: dict | None = None) -> None:
        """One streamed request, recorded here (latency, TTFT, tokens) or counted as failed."""
        try:
            lat, ttft, tok, _ = await one_request(client, url, body, headers)
        except Exception as exc:  # noqa: BLE001 - failures are what we count
            self.failed.append(repr(exc)[:300])
            return
        self.latency.append(lat)
        self.ttft.append(ttft)
        self.tokens += tok

    def summary(self) -> dict:
        n = len(self.latency)
        return {"requests": n + len(self.failed), "failed": len(self.failed), "wall_s": self.wall_s,
                "req_per_s": n / self.wall_s if self.wall_s else 0.0, "out_tok_per_s": self.tokens / self.wall_s if self.wall_s else 0.0,
                "ttft_p50_s": median(self.ttft), "ttft_p99_s": percentile(self.ttft, 99),
                "latency_p50_s": median(self.latency), "latency_p99_s": percentile(self.latency, 99)}


async def one_request(client, url: str, body: dict, headers: dict | None = None) -> tuple[float, float, int, str | None]:
    """Send one streamed completion; (latency, ttft, completion tokens, adapter version header)."""
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                             headers=headers or {}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        version = r.headers.get("x-lorafleet-adapter-version")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, ttft if ttft is not None else time.perf_counter() - started, tokens, version


async def replay(url: str, stream: list[dict], concurrency: int, headers: dict | None = None) -> Result:
    """Send ``stream`` (request bodies, in order) with ``concurrency`` requests in flight."""
    import httpx

    res = Result()
    queue = list(reversed(stream))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker():
            while queue:
                await res.send(client, url, queue.pop(), headers)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        res.wall_s = time.perf_counter() - started
    return res


def request_stream(prompts: list[str], models: list[str], n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """``n`` greedy completion requests, the models uniformly mixed (round-robin over a shuffled order)."""
    import random

    rng = random.Random(seed)
    order = [models[i % len(models)] for i in range(n)]
    rng.shuffle(order)
    return [{"model": m, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0} for i, m in enumerate(order)]


def warm(url: str, models: list[str], prompts: list[str], max_tokens: int = 8, rounds: int = 3) -> None:
    """A few requests per model, alone and concurrently: loading adapters, first-request paths
    (router, multiplexing, HTTP connections) and the engine's first batches are not timed."""
    for r in range(rounds):
        asyncio.run(replay(url, request_stream(prompts, models, max(len(models), 8), max_tokens, seed=100 + r), 1 if r == 0 else 8))


def process_role(cmdline: str) -> str:
    """Which part of a serving stack a process is, from its command line / title.

    engine: vLLM's EngineCore (the model); front: what handles HTTP and OpenAI work (Serve's proxy,
    HAProxy, the lorafleet replica, vLLM's API server process); ray: Ray's own daemons and
    controller. The lorafleet replica's own CPU is mostly front work: its engine core is a child."""
    if "EngineCore" in cmdline or "VLLM::" in cmdline:
        return "engine"
    if any(s in cmdline for s in ("ServeReplica", "ProxyActor", "HAProxyManager", "haproxy", "vllm.entrypoints.openai")):
        return "front"
    return "ray"


class CpuMeter:
    """CPU seconds used by a server's process tree between start() and stop(), split by role."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.before: dict[int, tuple[str, float]] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return out
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = (process_role(" ".join(p.cmdline()) + " " + p.name()), t.user + t.system)
            except psutil.Error:
                continue
        return out

    def start(self) -> None:
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        after, used = self._snapshot(), {"front": 0.0, "engine": 0.0, "ray": 0.0}
        for pid, (role, cpu) in after.items():
            used[role] += cpu - self.before.get(pid, (role, 0.0))[1]
        return used
