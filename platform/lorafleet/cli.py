"""The ``lorafleet`` command: base, eval, export, adapters, serve, tenants, tasks.

    lorafleet base build --out work/base --corpus queries.txt
    lorafleet eval --base work/base --adapter out/adapter --task banking77 --data test.csv --limit 200
    lorafleet eval --config jobs/configs/mixture-lora.yaml --adapter out/adapter     # every task of a mixture
    lorafleet export --base work/base --adapter out/adapter --merge --out merged/ --dtype bfloat16
    lorafleet adapters list
    lorafleet serve --config serve/tiny-cpu.yaml
    lorafleet tenants create acme --config serve/tiny-cpu.yaml
    lorafleet adapters register intent-v1 --source models:/demo-intent/1 --server http://127.0.0.1:8000
    lorafleet tasks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lorafleet.config.base import ConfigError
from lorafleet.ftapi.cli import add_file_commands, add_job_commands
from lorafleet.serve.manage_cli import add_adapter_api_commands, add_tenant_commands


def _base_build(args) -> int:
    from lorafleet.base.build import BaseBuildConfig, build_base
    from lorafleet.config.base import load_config

    # Command-line --out/--corpus win over a config file's; --set overrides come last.
    cli = [f"out={json.dumps(args.out)}"] + ([f"corpus={json.dumps(args.corpus)}"] if args.corpus else [])
    if args.config:
        cfg = load_config(BaseBuildConfig, args.config, [*cli, *args.set])
    else:
        from lorafleet.config.base import apply_overrides, validate_config

        data, errors = apply_overrides({"out": args.out, "corpus": args.corpus}, args.set)
        cfg = validate_config(BaseBuildConfig, data, "lorafleet base build", errors)
    info = build_base(cfg)
    print(json.dumps({"out": cfg.out, **{k: info[k] for k in ("parameters", "vocab_size", "corpus_lines")},
                      "pretrain_eval_loss": info["pretrain_metrics"].get("eval_loss")}, indent=2))
    return 0


def _eval(args) -> int:
    from lorafleet.evaluate import evaluate_adapter, evaluate_config

    adapter = None if args.adapter in (None, "none") else args.adapter
    if args.config:
        if args.task or args.data or args.column:
            raise ValueError("lorafleet eval: --config takes the tasks, files and columns from the config's data "
                             "section; drop --task/--data/--column (or drop --config)")
        from lorafleet.config import FinetuneConfig, load_config

        cfg = load_config(FinetuneConfig, args.config, args.set)
        print(json.dumps(evaluate_config(cfg, adapter, base=args.base, limit=args.limit, predictions=args.predictions,
                                         batch_size=args.batch_size, device=args.device, dtype=args.dtype), indent=2))
        return 0
    if not (args.base and args.task and args.data):
        raise ValueError("lorafleet eval needs --base, --task and --data (one task), or --config (the held-out rows "
                         "of every dataset of a fine-tune config, a task mixture or custom tasks included)")
    metrics = evaluate_adapter(args.base, adapter, args.task, args.data,
                               limit=args.limit, predictions=args.predictions, batch_size=args.batch_size,
                               columns=dict(c.split("=", 1) for c in args.column), device=args.device, dtype=args.dtype)
    print(json.dumps(metrics, indent=2))
    return 0


def _export(args) -> int:
    from lorafleet.evaluate import merge_adapter

    if not args.merge:
        print("nothing to do: pass --merge to write a merged full model", file=sys.stderr)
        return 2
    print(merge_adapter(args.base, args.adapter, args.out, device=args.device, dtype=args.dtype))
    return 0


def _adapters_list(args) -> int:
    from lorafleet.config.train import TrackingConfig
    from lorafleet.tracking import list_registered_adapters, resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(TrackingConfig())
    rows = list_registered_adapters(uri, args.name)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no registered adapters in {uri}")
        return 0
    print(f"{'name':30} {'version':>7}  {'task':14} {'method':6} {'r':>4}  base / source")
    for r in rows:
        t = r.get("tags", {})
        print(f"{r['name']:30} {r['version']:>7}  {t.get('task', ''):14} {t.get('method', ''):6} {t.get('r', ''):>4}  {t.get('base_model', '')}  {r.get('source', '')}")
    return 0


def _serve(args) -> int:
    from lorafleet.serve.cli import serve_main

    return serve_main(args.config, args.set)


def _tasks(args) -> int:
    from lorafleet.data import list_tasks

    for t in list_tasks():
        print(f"{t.name:16} {t.kind:14} metrics={','.join(t.metrics) or 'loss'}  hub={t.hub_name or '-'}  {t.description}")
    return 0


def _add_device_args(parser: argparse.ArgumentParser, dtype_auto: str) -> None:
    parser.add_argument("--device", default="auto", help="auto (the GPU where CUDA is available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=dtype_auto)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description="LoRA/QLoRA fine-tuning and multi-LoRA serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    base = sub.add_parser("base", help="build the small offline base model").add_subparsers(dest="base_command", required=True)
    b = base.add_parser("build", help="train a BPE tokenizer + tiny Llama and pre-train it on the corpus (Ray Train job)")
    b.add_argument("--out", required=True)
    b.add_argument("--corpus", nargs="+", default=[], help="plain-text files, one example per line")
    b.add_argument("--config", help="optional YAML with BaseBuildConfig fields")
    b.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    b.set_defaults(func=_base_build)

    e = sub.add_parser("eval", help="task metrics of base (+ adapter) on a data file, or on every dataset of a "
                                    "fine-tune config's held-out rows, by generation")
    e.add_argument("--base", help="base model (default with --config: its model.name_or_path)")
    e.add_argument("--adapter", default=None, help="adapter folder, or 'none' for the base alone")
    e.add_argument("--task")
    e.add_argument("--data")
    e.add_argument("--config", help="fine-tune YAML: score every dataset of its data section (one task, a mixture, "
                                    "custom tasks) on the validation rows training held out")
    e.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a --config value")
    e.add_argument("--limit", type=int, help="rows scored per dataset (default with --config: data.max_eval_samples)")
    e.add_argument("--predictions", help="write one JSON object per example (input order) here")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN", help="map a task field to a file column")
    _add_device_args(e, "auto: bfloat16 on a GPU, float32 on CPU")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="merge an adapter into its base and save a full model")
    x.add_argument("--base", required=True)
    x.add_argument("--adapter", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true")
    _add_device_args(x, "auto: the base's own dtype (config.json)")
    x.set_defaults(func=_export)

    a = sub.add_parser("adapters", help="adapters: the MLflow registry (list) and a running server (register, replace, pin, delete, status)"
                       ).add_subparsers(dest="adapters_command", required=True)
    al = a.add_parser("list", help="adapters registered in the MLflow model registry")
    al.add_argument("--tracking-uri")
    al.add_argument("--name")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=_adapters_list)
    add_adapter_api_commands(a)
    add_tenant_commands(sub)
    add_file_commands(sub)
    add_job_commands(sub)

    sv = sub.add_parser("serve", help="run the multi-LoRA server on a local Ray (blocks; Ctrl-C stops it)")
    sv.add_argument("--config", required=True, help="Serve YAML (serve/*.yaml) or a bare ServeConfig file")
    sv.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    sv.set_defaults(func=_serve)

    t = sub.add_parser("tasks", help="list the task catalogue")
    t.set_defaults(func=_tasks)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
