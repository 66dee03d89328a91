"""``make demo``: the whole platform in one command, on the embedded default.

Local Ray, a local MLflow store (SQLite under the work folder), a tiny base model built on the
spot from sample text the project generates itself, then:

1. sample data: customer-support queries labelled with an intent, sentences labelled claim /
   not_claim, and an unlabelled corpus;
2. the tiny base: BPE tokenizer + 4-layer Llama, pre-trained on the corpus by a Ray Train job;
3. two tenants' adapters on different tasks (acme: intent detection; globex: claim
   classification), each a real Ray Train LoRA job (FSDP2 over 2 workers), tracked in MLflow
   and registered;
4. a small Ray Tune sweep for acme's task, its best adapter registered as a new version;
5. the multi-LoRA server (Ray Serve + vLLM, ``serve/tiny-cpu.yaml``), two tenants created, each
   registering its adapter from the MLflow registry;
6. both tenants queried with the ``openai`` client: each adapter answers its own task; neither
   tenant can reach the other's adapter;
7. acme's adapter hot-swapped to the sweep's best version under live traffic, with zero
   failed requests;
8. a summary and where to look (MLflow UI, result files, loss curves); nothing is left running.

No network and nothing from outside the project. Re-running starts over in the same folder.

    .venv/bin/python -m lorafleet.demo [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = ".lorafleet-demo"
STAGES = 8
ADAPTER_VERSION_HEADER = "x-lorafleet-adapter-version"


class DemoFailed(RuntimeError):
    """A check the demo makes of the platform did not hold."""


def _stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def _check(ok: bool, what: str) -> None:
    _say(("ok    " if ok else "FAILED ") + what)
    if not ok:
        raise DemoFailed(what)


def _prepare_work(work: Path) -> None:
    """The demo owns its folder: a previous demo's folder is replaced, any other non-empty one is refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"error: {work} exists and was not made by the demo; pick another --work (nothing was deleted)")
        print(f"starting over: removing the previous demo's {work}", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by `python -m lorafleet.demo`; the next demo run replaces this folder\n")


class Sizes:
    """How much the demo trains: the full demo, or ``--quick`` (the test suite's end-to-end run)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.intents_per_label = 50 if quick else 80
        self.claims_per_label = 80 if quick else 100
        self.base_epochs = 4 if quick else 6
        self.intent_epochs = 4 if quick else 6
        self.claims_epochs = 6 if quick else 8
        self.sweep_samples = 1  # x the grid of 2 ranks = 2 trials
        self.sweep_epochs = 3 if quick else 5


# -- stages 1-4: data, base, two fine-tunes, a sweep ---------------------------------------------

def make_data(work: Path, sizes: Sizes) -> dict[str, Path]:
    from lorafleet import sample_data

    data = work / "data"
    intents = sample_data.intent_rows(n_per_intent=sizes.intents_per_label, seed=0)
    claims = sample_data.claim_rows(n_per_label=sizes.claims_per_label, seed=0)
    n_i, n_c = int(len(intents) * 0.8), int(len(claims) * 0.8)  # the rest is held out from training entirely
    paths = {
        "intents_train": sample_data.write_csv(data / "intents_train.csv", intents[:n_i]),
        "intents_test": sample_data.write_csv(data / "intents_test.csv", intents[n_i:]),
        "claims_train": sample_data.write_csv(data / "claims_train.csv", claims[:n_c]),
        "claims_test": sample_data.write_csv(data / "claims_test.csv", claims[n_c:]),
        "corpus": sample_data.write_corpus(data / "corpus.txt"),
    }
    _say(f"{data}: intents {n_i} train / {len(intents) - n_i} held out (8 intents), claims {n_c} train / "
         f"{len(claims) - n_c} held out, corpus.txt (unlabelled)")
    return paths


def build_tiny_base(work: Path, corpus: Path, sizes: Sizes) -> Path:
    from lorafleet.base.build import BaseBuildConfig, PretrainConfig, build_base

    base = work / "base"
    info = build_base(BaseBuildConfig(out=str(base), corpus=[str(corpus)], pretrain=PretrainConfig(num_epochs=sizes.base_epochs)))
    _say(f"{base}: {info['parameters']:,} parameters, vocab {info['vocab_size']}, "
         f"pre-train eval loss {info['pretrain_metrics'].get('eval_loss', float('nan')):.3f}")
    return base


def finetune(work: Path, base: Path, config: str, overrides: list[str]) -> dict:
    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.train import run_finetune

    cfg = load_config(FinetuneConfig, REPO / "jobs/configs" / config,
                      [f"model.name_or_path={base}", "tracking.experiment_name=demo", "checkpoint.every_n_steps=40", *overrides])
    cfg = cfg.model_copy(update={"output_dir": str(work / "outputs" / cfg.run_name)})
    res = run_finetune(cfg)
    m = res["metrics"]
    _say(f"{cfg.run_name}: validation accuracy {m.get('eval_accuracy', 0):.3f}, macro-F1 {m.get('eval_macro_f1', 0):.3f}, "
         f"{m.get('tokens_per_s', 0):.0f} tokens/s; MLflow run {res['mlflow_run_id']}, "
         f"registered {res['registered_model']} v{res['registered_version']}")
    return res


def sweep(work: Path, base: Path, train_csv: Path, sizes: Sizes) -> dict:
    import yaml

    from lorafleet.config import load_config
    from lorafleet.config.sweep import SweepConfig
    from lorafleet.tune import run_sweep

    data = yaml.safe_load((REPO / "jobs/configs/banking77-sweep.yaml").read_text())
    data["sweep"].update(name="demo-intent-sweep", num_samples=sizes.sweep_samples, max_concurrent_trials=2, eval_every_n_steps=10,
                         storage_path=str(work / "tune_results"),
                         space={"lora.r": {"grid": [8, 16]}, "training.learning_rate": {"loguniform": [2.0e-3, 6.0e-3]}},
                         scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    ft = data["finetune"]
    ft.update(run_name="demo-intent-sweep", output_dir=str(work / "outputs" / "demo-intent-sweep"))
    ft["model"]["name_or_path"] = str(base)
    ft["data"].update(path=str(train_csv), max_eval_samples=100)
    ft["training"].update(num_epochs=sizes.sweep_epochs, per_device_batch_size=16)
    ft["lora"] = {"lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
    ft["distributed"] = {"num_workers": 1}  # 2 trials x 1 worker at a time on a 2-core machine
    ft["tracking"] = {"experiment_name": "demo", "register_as": "demo-intent"}  # the best trial becomes demo-intent v2
    cfg = load_config(SweepConfig, None, base=data)
    result = run_sweep(cfg)
    best = result["best"]
    if not best or not best.get("registered_version"):
        raise DemoFailed(f"the sweep registered no best adapter: {json.dumps(result['trials'], default=str)[:800]}")
    _say(f"best trial {best['trial_id']}: eval_accuracy {best['metric']:.3f} with {best['params']}; "
         f"registered {best['registered_model']} v{best['registered_version']}")
    return result


# -- stages 5-7: serving, tenants, isolation, hot-swap -------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, base: Path):
    """Deploy ``serve/tiny-cpu.yaml`` (the demo's paths, no shared adapters, keys required) on this Ray."""
    import httpx
    from ray import serve

    from lorafleet.serve.app import app_from_config
    from lorafleet.serve.config import load_serve_config

    port = free_port()
    cfg = load_serve_config(REPO / "serve/tiny-cpu.yaml", [
        f"model={base}", f"port={port}", f"mlflow_tracking_uri=sqlite:///{work}/mlflow.db", f"allowed_local_roots=[{work}]",
        "adapters=[]", f"tenancy.state_dir={work / 'serve-state'}", "tenancy.allow_anonymous=false",
        f"adapter_cache_dir={work / 'serve' / 'adapters'}"])
    started = time.monotonic()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app_from_config(cfg), name="lorafleet", route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}"
    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise DemoFailed("the server did not become ready within 300 s")
        time.sleep(1)
    _say(f"serving {cfg.served_model_name} at {url}/v1 (ready after {time.monotonic() - started:.0f} s; "
         f"max_loras={cfg.engine.max_loras}, max_cpu_loras={cfg.engine.max_cpu_loras})")
    return cfg, url


def _api(method: str, url: str, key: str, json_body=None, expect: int = 200) -> dict:
    import httpx

    r = httpx.request(method, url, headers={"authorization": f"Bearer {key}"}, json=json_body, timeout=120)
    if r.status_code != expect:
        raise DemoFailed(f"{method} {url} answered {r.status_code}, expected {expect}: {r.text[:500]}")
    return r.json()


def create_tenants(url: str, admin_key: str, registrations: dict[str, tuple[str, str]]) -> dict[str, str]:
    """POST /admin/tenants for each tenant, then the tenant registers its adapter from MLflow with its own key."""
    keys = {}
    for tenant, (adapter, source) in registrations.items():
        created = _api("POST", f"{url}/admin/tenants", admin_key, {"name": tenant}, expect=201)
        keys[tenant] = created["api_key"]["key"]
        info = _api("POST", f"{url}/v1/adapters", keys[tenant], {"name": adapter, "source": source}, expect=201)
        _say(f"tenant {tenant}: key {created['api_key']['id']}..., adapter `{adapter}` v{info['version']} from {source} "
             f"(rank {info.get('rank')}, {info.get('size_bytes', 0) / 1024:.0f} KiB, sha256 {str(info.get('sha256'))[:12]})")
    return keys


def _client(url: str, key: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def score(client, model: str, task: str, rows: list[dict], batch: int = 8) -> tuple[float, list[tuple[str, str, str]]]:
    """Accuracy of ``model`` over ``rows`` through the completions API (8 prompts a request, greedy),
    formatted and scored by the same task code as training and ``lorafleet eval``."""
    from lorafleet.data.metrics import compute_metrics
    from lorafleet.data.tasks import get_task

    spec = get_task(task)
    answers = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        out = client.completions.create(model=model, prompt=[spec.format_prompt(r) for r in part], max_tokens=16,
                                        temperature=0, stop=["\n"])
        texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
        answers += [(spec.format_input(r), t.strip(), spec.format_reference(r)) for r, t in zip(part, texts)]
    accuracy = compute_metrics(spec, [p for _, p, _ in answers], [ref for _, _, ref in answers])["accuracy"]
    return accuracy, answers


def query_tenants(url: str, cfg, keys: dict[str, str], paths: dict[str, Path]) -> dict:
    import httpx
    import openai

    from lorafleet.data.loading import read_rows

    acme, globex = _client(url, keys["acme"]), _client(url, keys["globex"])
    intents, claims = read_rows(paths["intents_test"]), read_rows(paths["claims_test"])
    results: dict = {}
    for tenant, client, model, task, rows in (("acme", acme, "intent", "banking77", intents),
                                              ("globex", globex, "claims", "classification", claims)):
        acc, answers = score(client, model, task, rows)
        base_acc, _ = score(client, cfg.served_model_name, task, rows)
        results[tenant] = {"adapter": model, "accuracy": acc, "base_accuracy": base_acc, "examples": len(rows)}
        _say(f"{tenant} / {model}: held-out accuracy {acc:.3f} over {len(rows)} examples (the base alone: {base_acc:.3f})")
        for text, pred, ref in answers[:2]:
            _say(f"    {text!r} -> {pred!r} (reference {ref})")
        _check(acc > base_acc + 0.2, f"{tenant}'s adapter answers its own task far better than the base alone")

    own = {m.id for m in acme.models.list()}
    _check("intent" in own and "claims" not in own, f"acme's /v1/models lists its own adapter, not globex's: {sorted(own)}")
    for name in ("claims", "globex/claims"):
        try:
            acme.completions.create(model=name, prompt="Text: hello\nLabel:", max_tokens=4)
            status = 200
        except openai.NotFoundError as exc:
            status = exc.status_code
        _check(status == 404, f"acme calling globex's adapter as `{name}`: 404 model_not_found (got {status})")
    r = httpx.delete(f"{url}/v1/adapters/globex/claims", headers={"authorization": f"Bearer {keys['acme']}"}, timeout=30)
    _check(r.status_code == 403, f"acme deleting globex's adapter: 403 (got {r.status_code})")
    r = httpx.post(f"{url}/v1/completions", json={"model": "intent", "prompt": "hi", "max_tokens": 2}, timeout=30)
    _check(r.status_code == 401, f"a request without a key: 401 (got {r.status_code})")
    results["isolation"] = "ok"
    return results


def hot_swap(url: str, key: str, adapter: str, new_source: str, prompts: list[str], threads: int = 4) -> dict:
    """Replace ``adapter`` with ``new_source`` while ``threads`` clients keep calling it; count answers by version and failures."""
    client = _client(url, key)
    stop, swapped = threading.Event(), threading.Event()
    lock = threading.Lock()
    versions: Counter = Counter()
    failures: list[str] = []
    after_swap = Counter()

    def traffic(seed: int) -> None:
        i = seed
        while not stop.is_set():
            i += 1
            try:
                raw = client.completions.with_raw_response.create(model=adapter, prompt=prompts[i % len(prompts)], max_tokens=12,
                                                                  temperature=0, stop=["\n"])
                raw.parse()
                with lock:
                    versions[raw.headers.get(ADAPTER_VERSION_HEADER)] += 1
                    if swapped.is_set():
                        after_swap[raw.headers.get(ADAPTER_VERSION_HEADER)] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is what the demo counts
                with lock:
                    failures.append(repr(exc)[:300])

    workers = [threading.Thread(target=traffic, args=(n * 7,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    time.sleep(3)
    before = _api("GET", f"{url}/v1/adapters/{adapter}", key)["version"]
    started = time.monotonic()
    info = _api("PUT", f"{url}/v1/adapters/{adapter}", key, {"source": new_source, "expected_version": before})
    swap_s = time.monotonic() - started
    swapped.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the new version has answered a good number of requests
        time.sleep(1)
        with lock:
            if after_swap[str(info["version"])] >= 20:
                break
    stop.set()
    for w in workers:
        w.join(timeout=120)
    total = sum(versions.values()) + len(failures)
    _say(f"{total} requests from {threads} concurrent clients; replace took {swap_s:.1f} s "
         f"(v{before} -> v{info['version']} from {new_source})")
    _say("answered by version: " + ", ".join(f"v{v}: {n}" for v, n in sorted(versions.items())) + f"; failed: {len(failures)}")
    for f in failures[:5]:
        _say(f"    failure: {f}")
    _check(not failures, "zero failed requests during the hot-swap")
    _check(versions[str(before)] > 0 and versions[str(info["version"])] > 0, "requests were answered by the old and then the new version")
    return {"requests": total, "by_version": dict(versions), "failed": len(failures), "replace_s": round(swap_s, 2),
            "from_version": before, "to_version": info["version"], "source": new_source}


# -- the run --------------------------------------------------------------------------------------

def run(work: Path, sizes: Sizes) -> dict:
    from lorafleet.ray_local import start_local_ray

    os.environ["LORAFLEET_HOME"] = str(work)
    # Logical CPUs beyond the 2 cores: Train controllers, sweep trial functions, Serve's controller,
    # proxy and replicas each hold a slot while mostly waiting (README: troubleshooting).
    # address="local": always a Ray of its own, even where another one runs (and stopped with it).
    start_local_ray(8, address="local", runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}})
    started = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        t = time.monotonic()
        out = fn(*args)
        timings[name] = round(time.monotonic() - t, 1)
        return out

    _stage(1, "sample data, generated locally: intent queries, claim / not-claim sentences, an unlabelled corpus")
    paths = timed("data", make_data, work, sizes)

    _stage(2, "tiny base: BPE tokenizer + 4-layer Llama, pre-trained on the corpus by a Ray Train job (method full)")
    base = timed("base", build_tiny_base, work, paths["corpus"], sizes)

    _stage(3, "two tenants' adapters: Ray Train LoRA jobs (FSDP2 over 2 workers), tracked in MLflow and registered")
    intent = timed("finetune_intent", finetune, work, base, "banking77-lora.yaml", [
        f"data.path={paths['intents_train']}", "run_name=demo-intent", f"training.num_epochs={sizes.intent_epochs}",
        "training.per_device_batch_size=8", "data.max_eval_samples=100", "tracking.register_as=demo-intent"])
    claims = timed("finetune_claims", finetune, work, base, "claims-lora.yaml", [
        f"data.path={paths['claims_train']}", "run_name=demo-claims", f"training.num_epochs={sizes.claims_epochs}",
        "training.per_device_batch_size=4", "data.max_eval_samples=100", "tracking.register_as=demo-claims"])

    _stage(4, "a Ray Tune sweep for acme's intent adapter (rank x learning rate, ASHA); the best trial registered")
    swept = timed("sweep", sweep, work, base, paths["intents_train"], sizes)
    best = swept["best"]

    _stage(5, "the multi-LoRA server (Ray Serve + vLLM), two tenants, adapters registered from the MLflow registry")
    admin_key = os.environ.setdefault("LORAFLEET_ADMIN_KEY", secrets.token_urlsafe(32))
    cfg, url = timed("serve_start", start_server, work, base)
    v1 = f"models:/{intent['registered_model']}/{intent['registered_version']}"
    keys = create_tenants(url, admin_key, {"acme": ("intent", v1),
                                           "globex": ("claims", f"models:/{claims['registered_model']}/{claims['registered_version']}")})
    keys_file = work / "serve-state" / "demo-tenant-keys.json"  # so `lorafleet serve` can be tried with them afterwards
    keys_file.write_text(json.dumps(keys, indent=2))
    keys_file.chmod(0o600)
    _say(f"the tenants' API keys (shown once by the server) are kept for you in {keys_file} (mode 600)")

    _stage(6, "both tenants over HTTP with the openai client: each adapter answers its own task, neither reaches the other's")
    queried = timed("query", query_tenants, url, cfg, keys, paths)

    _stage(7, f"hot-swap acme's `intent` to the sweep's best ({best['registered_model']} v{best['registered_version']}) under live traffic")
    from lorafleet.data.loading import read_rows
    from lorafleet.data.tasks import get_task

    spec = get_task("banking77")
    intents = read_rows(paths["intents_test"])
    swap = timed("hot_swap", hot_swap, url, keys["acme"], "intent", f"models:/{best['registered_model']}/{best['registered_version']}",
                 [spec.format_prompt(r) for r in intents])
    after, _ = score(_client(url, keys["acme"]), "intent", "banking77", intents)
    swap["accuracy_after"] = after
    _say(f"acme / intent now answers with v{swap['to_version']}: held-out accuracy {after:.3f} "
         f"(was {queried['acme']['accuracy']:.3f} with {v1})")

    uri = f"sqlite:///{work}/mlflow.db"
    summary = {
        "elapsed_s": round(time.time() - started, 1),
        "stage_seconds": timings,
        "work": str(work),
        "base_model": str(base),
        "server": url,
        "adapters": {
            "acme/intent": {"mlflow": v1, "validation": intent["metrics"], "result_json": str(Path(intent["adapter_path"]).parent / "result.json"),
                            "loss_curve": intent["loss_curve"]},
            "globex/claims": {"mlflow": f"models:/{claims['registered_model']}/{claims['registered_version']}", "validation": claims["metrics"],
                              "result_json": str(Path(claims["adapter_path"]).parent / "result.json"), "loss_curve": claims["loss_curve"]},
        },
        "sweep": {"best": {k: best[k] for k in ("trial_id", "metric", "params", "registered_model", "registered_version")},
                  "trials": [{k: t[k] for k in ("trial_id", "status", "metric", "params")} for t in swept["trials"]],
                  "result_json": str(work / "outputs" / "demo-intent-sweep" / "result.json"),
                  "plot": str(work / "outputs" / "demo-intent-sweep" / "sweep_metric_vs_params.png")},
        "served": queried,
        "hot_swap": swap,
        "mlflow_tracking_uri": uri,
    }
    return summary


def _stop_everything() -> None:
    import ray

    try:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        print(f"stopping Serve: {exc!r}", file=sys.stderr)
    ray.shutdown()


def _leftovers(grace_s: float = 20.0) -> list[str]:
    """Processes this demo started that are still alive after ``grace_s`` (Ray's own shut down asynchronously)."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in alive]
        time.sleep(0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="lorafleet-work/demo", help="folder for everything the demo writes (replaced on re-run)")
    parser.add_argument("--quick", action="store_true", help="train less (the test suite's end-to-end run)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    _prepare_work(work)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    code, summary = 0, None
    try:
        summary = run(work, Sizes(args.quick))
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("\nstopping the server and Ray ...", flush=True)
        _stop_everything()
    left = _leftovers()
    if left:
        print(f"warning: processes still running after the demo: {left}", file=sys.stderr)
        code = code or 1
    if summary is None:
        return code
    summary["left_running"] = left
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print("\n=== [8/8] summary\n" + json.dumps({k: summary[k] for k in ("elapsed_s", "stage_seconds", "served", "hot_swap")},
                                              indent=2, default=str))
    uri = summary["mlflow_tracking_uri"]
    serve_cmd = ".venv/bin/lorafleet serve --config serve/tiny-cpu.yaml"
    if work != (REPO / "lorafleet-work" / "demo").resolve():  # tiny-cpu.yaml's paths are the default folder's
        serve_cmd += (f" --set model={work / 'base'} --set mlflow_tracking_uri={uri} --set adapters=[]"
                      f" --set allowed_local_roots=[{work}] --set tenancy.state_dir={work / 'serve-state'}")
    print(f"""
Where to look
  everything the demo wrote      {work}  (summary.json: all of the above)
  MLflow UI                      .venv/bin/mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000
                                 (experiment `demo`: the runs, the sweep's parent and trial runs; Models: demo-intent, demo-claims)
  result files                   {summary['adapters']['acme/intent']['result_json']}
                                 {summary['adapters']['globex/claims']['result_json']}
                                 {summary['sweep']['result_json']}
  loss curves                    {summary['adapters']['acme/intent']['loss_curve']}
                                 {summary['adapters']['globex/claims']['loss_curve']}
  sweep plot                     {summary['sweep']['plot']}
  serve it again                 {serve_cmd}
                                 (tenants, keys and adapters persist in {work / 'serve-state'}; the keys: demo-tenant-keys.json)
Nothing is left running.""" if not left else "")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
