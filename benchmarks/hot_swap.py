"""Hot-swap latency: time from the replace API call (`PUT /v1/adapters/{name}`) to the first token
served by the new version, p50/p99 over many swaps, and the latency of unrelated traffic during
the swaps vs without them. Every request's outcome is counted: the target is zero failures.

    .venv/bin/python benchmarks/hot_swap.py [--swaps 30] [--quick]

One `lorafleet serve` (the demo's tiny base by default; `--base medium` for the 103 M one), a
tenant created through the admin API, its adapter `hot` registered from a local folder. Then:
1. 20 s of unrelated traffic alone (a shared adapter, 4 clients, streamed greedy completions);
2. the same traffic while the tenant replaces `hot` again and again, alternating two adapter
   folders: after each PUT is sent, the tenant streams requests for `hot` until one is answered
   by the new version (`x-lorafleet-adapter-version`); the swap time is from sending the PUT to
   that response's first token.
Writes benchmarks/results/hot_swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_adapters, build_base, corpus_lines, emit, median, parameters, percentile, save, table  # noqa: E402
from serve_throughput import BASES  # noqa: E402
from servers import Result, one_request, start_lorafleet, warm  # noqa: E402

TARGET_P50_S = 0.5


async def unrelated(url: str, prompts: list[str], stop: asyncio.Event, res: Result, clients: int, max_tokens: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        async def loop(k: int):
            i = k
            while not stop.is_set():
                i += clients
                await res.send(client, url, {"model": "bystander", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                             "temperature": 0})
        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        res.wall_s = time.perf_counter() - started


async def run(url: str, admin: str, sources: list[Path], prompts: list[str], a) -> tuple[dict, dict, list[float], list[str]]:
    import httpx

    async with httpx.AsyncClient(timeout=300) as http:
        r = await http.post(f"{url}/admin/tenants", json={"name": "bench"}, headers={"authorization": f"Bearer {admin}"})
        r.raise_for_status()
        key = r.json()["api_key"]["key"]
        auth = {"authorization": f"Bearer {key}"}
        r = await http.post(f"{url}/v1/adapters", json={"name": "hot", "source": str(sources[0])}, headers=auth)
        r.raise_for_status()
        version = r.json()["version"]
        await one_request(http, url, {"model": "hot", "prompt": prompts[0], "max_tokens": 2, "temperature": 0}, auth)

        # 1. unrelated traffic alone
        alone, stop = Result(), asyncio.Event()
        task = asyncio.create_task(unrelated(url, prompts, stop, alone, a.clients, a.max_tokens))
        await asyncio.sleep(a.quiet_s)
        stop.set()
        await task

        # 2. the same traffic during swaps
        during, stop = Result(), asyncio.Event()
        task = asyncio.create_task(unrelated(url, prompts, stop, during, a.clients, a.max_tokens))
        swaps, failures = [], []
        for n in range(a.swaps):
            source = sources[(n + 1) % len(sources)]
            t0 = time.perf_counter()
            r = await http.put(f"{url}/v1/adapters/hot", json={"source": str(source), "expected_version": version}, headers=auth)
            if r.status_code != 200:
                failures.append(f"PUT {r.status_code}: {r.text[:200]}")
                continue
            new = r.json()["version"]
            while True:
                sent = time.perf_counter()
                try:
                    _, ttft, _, got = await one_request(http, url, {"model": "hot", "prompt": prompts[n % len(prompts)], "max_tokens": 4,
                                                                    "temperature": 0}, auth)
                except Exception as exc:  # noqa: BLE001
                    failures.append(repr(exc)[:300])
                    continue
                if got == str(new):
                    swaps.append(sent + ttft - t0)
                    break
                if time.perf_counter() - t0 > 60:
                    failures.append(f"version {new} not served within 60 s of the PUT")
                    break
            version = new
            await asyncio.sleep(a.gap_s)
        stop.set()
        await task
    return alone.summary(), during.summary(), swaps, failures + alone.failed + during.failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny", choices=list(BASES))
    ap.add_argument("--swaps", type=int, default=30)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of the unrelated traffic")
    ap.add_argument("--quiet-s", type=float, default=20.0, help="seconds of unrelated traffic without swaps")
    ap.add_argument("--gap-s", type=float, default=0.5, help="pause between swaps")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="few swaps, short quiet period (smoke test)")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench"))
    a = ap.parse_args()
    if a.quick:
        a.swaps, a.quiet_s, a.max_tokens = 4, 4.0, 8
    work = Path(a.work).resolve()
    base = build_base(work / f"serve-base-{a.base}", **BASES[a.base])
    adapters = build_adapters(base, work / f"swap-adapters-{a.base}", 3)
    prompts = corpus_lines(400)
    admin = secrets.token_urlsafe(24)
    server = start_lorafleet(work, base, {"bystander": adapters[2]}, max_loras=4, max_cpu_loras=8, name=f"swap-{a.base}", admin_key=admin)
    print(f"base {a.base}: {parameters(base):,} parameters; server ready in {server.startup_s:.0f} s", flush=True)
    try:
        warm(server.url, ["bystander"], prompts)
        alone, during, swaps, failures = asyncio.run(run(server.url, admin, adapters[:2], prompts, a))
    finally:
        server.stop()
    rows = [emit({"bench": "hot_swap", "traffic": "unrelated, no swaps", **alone}),
            emit({"bench": "hot_swap", "traffic": "unrelated, during swaps", **during})]
    summary = {"swaps": len(swaps), "swap_to_first_token_p50_s": median(swaps), "swap_to_first_token_p99_s": percentile(swaps, 99),
               "swap_to_first_token_max_s": max(swaps) if swaps else float("nan"),
               "unrelated_latency_p50_ratio_during_vs_alone": during["latency_p50_s"] / alone["latency_p50_s"],
               "unrelated_latency_p99_ratio_during_vs_alone": during["latency_p99_s"] / alone["latency_p99_s"],
               "failed": len(failures), "failures": failures[:10], "target_p50_s": TARGET_P50_S}
    summary["met"] = summary["swap_to_first_token_p50_s"] <= TARGET_P50_S and not failures
    print(table(rows, ["traffic", "requests", "failed", "req_per_s", "ttft_p50_s", "latency_p50_s", "latency_p99_s"]))
    print(f"\nswap -> first token of the new version: p50 {summary['swap_to_first_token_p50_s']:.3f} s, "
          f"p99 {summary['swap_to_first_token_p99_s']:.3f} s over {len(swaps)} swaps; failed requests: {len(failures)} "
          f"(target p50 <= {TARGET_P50_S} s and zero failures: {'met' if summary['met'] else 'MISSED'})")
    emit({"bench": "hot_swap", "summary": summary})
    save("hot_swap", rows, summary, settings=vars(a), swap_seconds=swaps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
