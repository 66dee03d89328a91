"""Serving throughput and latency: the lorafleet server over HTTP vs vLLM's own OpenAI server.

    .venv/bin/python benchmarks/serve_throughput.py [--concurrency 1 4 16] [--quick]

Both servers run at once on the same machine (the machine's CPU use with both idle is measured
before every run and recorded: an idle server that burns CPU would skew the other's figures) with the same base, the same 4 adapters and the
same engine settings (float32, eager, max_loras 4, max_num_seqs 16, 512 MiB KV cache); each
replays the same stream of greedy streamed completions (32 new tokens, the 4 adapters
uniformly mixed) at each concurrency, alternating lorafleet / vLLM per level, and the ratio
of requests/s is reported per level. Bases: "medium", a random Llama of ~103 M parameters
(hidden 1024, 8 layers), where the model rather than HTTP dominates, and the tiny base of the
demo (~1.3 M parameters), where per-request overhead shows. Writes
benchmarks/results/serve_throughput.json and serve_throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import psutil
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_adapters, build_base, corpus_lines, emit, parameters, save, table  # noqa: E402
from servers import replay, request_stream, start_lorafleet, start_vllm, warm  # noqa: E402

TARGET = 1.0
BASES = {  # name -> build_base arguments
    "medium": {"hidden": 1024, "layers": 8, "intermediate": 2816, "heads": 16},
    "tiny": {"hidden": 128, "layers": 4, "intermediate": 512, "heads": 2, "kv_heads": 1},
}


def bench_base(work: Path, name: str, a) -> list[dict]:
    base = build_base(work / f"serve-base-{name}", **BASES[name])
    adapters = dict(zip([f"a{i}" for i in range(4)], build_adapters(base, work / f"serve-adapters-{name}", 4)))
    models = list(adapters)
    prompts = corpus_lines(400)
    print(f"[{name}] base {parameters(base):,} parameters, adapters {models}", flush=True)
    servers = [start_lorafleet(work, base, adapters, max_loras=4, max_cpu_loras=8, name=f"lorafleet-{name}"),
               start_vllm(work, base, adapters, max_loras=4, max_cpu_loras=8)]
    rows = []
    try:
        for s in servers:
            print(f"[{name}] {s.name} ready in {s.startup_s:.0f} s", flush=True)
            warm(s.url, models, prompts)
        for c in a.concurrency:
            stream = request_stream(prompts, models, max(a.min_requests, a.per_client * c), a.max_tokens, seed=c)
            level = {}
            for s in (servers if c % 2 else servers[::-1]):  # alternate who goes first
                time.sleep(2)  # past vLLM's one-second busy-poll after the previous run
                idle = psutil.cpu_percent(interval=2)  # both servers idle: anything here would steal from the measurement
                res = {**asyncio.run(replay(s.url, stream, c)).summary(), "idle_cpu_percent_before": idle}
                level[s.name.split("-")[0]] = res
                rows.append(emit({"bench": "serve_throughput", "base": name, "server": s.name.split("-")[0], "concurrency": c, **res}))
            ratio = level["lorafleet"]["req_per_s"] / level["vllm"]["req_per_s"]
            rows.append(emit({"bench": "serve_throughput", "base": name, "server": "ratio", "concurrency": c, "req_per_s": ratio,
                              "out_tok_per_s": level["lorafleet"]["out_tok_per_s"] / level["vllm"]["out_tok_per_s"],
                              "ttft_p50_s": level["lorafleet"]["ttft_p50_s"] / level["vllm"]["ttft_p50_s"],
                              "latency_p50_s": level["lorafleet"]["latency_p50_s"] / level["vllm"]["latency_p50_s"]}))
    finally:
        for s in servers:
            s.stop()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bases = sorted({r["base"] for r in rows})
    fig = Figure(figsize=(5 * len(bases), 3.5))
    FigureCanvasAgg(fig)
    for i, b in enumerate(bases):
        ax = fig.add_subplot(1, len(bases), i + 1)
        for server, style in (("lorafleet", "o-"), ("vllm", "s--")):
            pts = sorted((r["concurrency"], r["req_per_s"]) for r in rows if r["base"] == b and r["server"] == server)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=server)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{b} base")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--per-client", type=int, default=5, help="requests per concurrent client at each level")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny base, concurrency 1 and 4, few requests (smoke test)")
    ap.add_argument("--work", default=str(REPO / "lorafleet-work" / "bench"))
    a = ap.parse_args()
    if a.quick:
        a.bases, a.concurrency, a.per_client, a.min_requests, a.max_tokens = ["tiny"], [1, 4], 2, 4, 8
    work = Path(a.work).resolve()
    rows = [r for b in a.bases for r in bench_base(work, b, a)]
    print(table(rows, ["base", "server", "concurrency", "req_per_s", "out_tok_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                       "latency_p99_s", "failed"]))
    ratios = {f"{r['base']}@{r['concurrency']}": r["req_per_s"] for r in rows if r["server"] == "ratio"}
    worst = min(ratios.values())
    summary = {"ratio_req_per_s_lorafleet_over_vllm": ratios, "worst": worst, "target": TARGET, "met": worst >= TARGET,
               "failed": sum(r.get("failed", 0) for r in rows if r["server"] != "ratio")}
    print(f"\nlorafleet / vLLM requests/s: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + f" (target >= {TARGET}: {'met' if worst >= TARGET else 'MISSED'})")
    emit({"bench": "serve_throughput", "summary": summary})
    plot([r for r in rows if r["server"] != "ratio"], Path(__file__).resolve().parent / "results" / "serve_throughput.png")
    save("serve_throughput", rows, summary, settings=vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
