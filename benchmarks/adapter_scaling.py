"""Adapter-count scaling: lorafleet's throughput with 1, 4, 16 and 64 distinct adapters in
uniformly mixed traffic, with `max_loras` >= the count and smaller (8: adapters take turns in
the engine's slots, LRU), as a ratio to the single-adapter run.

    .venv/bin/python benchmarks/adapter_scaling.py [--base medium] [--quick]

Each setting is its own `lorafleet serve` (same base, engine settings of serve_throughput.py,
max_cpu_loras = the adapter count, so the host cache holds them all and only the slots churn),
warmed with one request per adapter, then the same number of greedy streamed completions (32
new tokens) at concurrency 16. Writes benchmarks/results/adapter_scaling.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_adapters, build_base, corpus_lines, emit, parameters, save, table  # noqa: E402
from serve_throughput import BASES  # noqa: E402
from servers import replay, request_stream, start_lorafleet, warm  # noqa: E402

TARGETS = {(16, 16): 0.85, (64, 8): 0.6}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    full = sorted((r["adapters"], r["ratio"]) for r in rows if r["max_loras"] >= r["adapters"])
    few = sorted((r["adapters"], r["ratio"]) for r in rows if r["max_loras"] < r["adapters"])
    ax.plot([p[0] for p in full], [p[1] for p in full], "o-", label="max_loras >= adapters")
    if few:
        ax.plot([p[0] for p in few], [p[1] for p in few], "s--", label=f"max_loras = {rows[-1]['max_loras']}")
    for (n, _), t in TARGETS.items():
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("distinct adapters in the traffic")
    ax.set_ylabel("requests/s vs 1 adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="medium", choices=list(BASES))
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--small-max-loras", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny base, 1 and 4 adapters, few requests (smoke test)")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench"))
    a = ap.parse_args()
    if a.quick:
        a.base, a.counts, a.small_max_loras, a.requests, a.max_tokens, a.concurrency = "tiny", [1, 4], 2, 16, 8, 4
    work = Path(a.work).resolve()
    base = build_base(work / f"serve-base-{a.base}", **BASES[a.base])
    all_adapters = build_adapters(base, work / f"scaling-adapters-{a.base}", max(a.counts))
    prompts = corpus_lines(400)
    settings = [(n, n) for n in a.counts] + [(n, a.small_max_loras) for n in a.counts if n > a.small_max_loras]
    print(f"base {a.base}: {parameters(base):,} parameters; settings (adapters, max_loras): {settings}", flush=True)
    rows = []
    for n, max_loras in settings:
        adapters = {f"s{i:03d}": p for i, p in enumerate(all_adapters[:n])}
        server = start_lorafleet(work, base, adapters, max_loras=max_loras, max_cpu_loras=max(n, max_loras), name=f"scaling-{n}-{max_loras}")
        try:
            warm(server.url, list(adapters), prompts, rounds=2)
            res = asyncio.run(replay(server.url, request_stream(prompts, list(adapters), a.requests, a.max_tokens, seed=1), a.concurrency))
        finally:
            server.stop()
        rows.append(emit({"bench": "adapter_scaling", "adapters": n, "max_loras": max_loras, **res.summary()}))
    single = next(r["req_per_s"] for r in rows if r["adapters"] == min(a.counts))
    for r in rows:
        r["ratio"] = r["req_per_s"] / single
    print(table(rows, ["adapters", "max_loras", "req_per_s", "ratio", "out_tok_per_s", "latency_p50_s", "latency_p99_s", "failed"]))
    checks = {f"{n} adapters, max_loras={m}": {"ratio": r["ratio"], "target": t, "met": r["ratio"] >= t}
              for (n, m), t in TARGETS.items() for r in rows if (r["adapters"], r["max_loras"]) == (n, m)}
    summary = {"ratios": {f"{r['adapters']}/{r['max_loras']}": r["ratio"] for r in rows}, "targets": checks,
               "failed": sum(r["failed"] for r in rows), "base_parameters": parameters(base)}
    for k, v in checks.items():
        print(f"{k}: {v['ratio']:.3f} of 1 adapter (target >= {v['target']}: {'met' if v['met'] else 'MISSED'})")
    emit({"bench": "adapter_scaling", "summary": summary})
    plot(rows, Path(__file__).resolve().parent / "results" / "adapter_scaling.png")
    save("adapter_scaling", rows, summary, settings=vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
