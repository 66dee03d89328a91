"""``lorafleet files list|show|delete`` and ``lorafleet jobs list|show|cancel``: every tenant's training files
and fine-tuning jobs, for operators.

They work on the server's registry and state dir directly (as ``lorafleet tenants`` does), so
they need no key and no running server; a server sees a deletion at once::

    lorafleet files list --config serve/tiny-cpu.yaml [--tenant acme] [--json]
    lorafleet files show file-0123abcd... --config serve/tiny-cpu.yaml
    lorafleet files delete file-0123abcd... --config serve/tiny-cpu.yaml
    lorafleet jobs list --config serve/tiny-cpu.yaml [--tenant acme] [--json]
    lorafleet jobs show ftjob-0123abcd... --config serve/tiny-cpu.yaml      (the job, its pinned config, its events)
    lorafleet jobs cancel ftjob-0123abcd... --config serve/tiny-cpu.yaml

Run them where the server's state dir is reachable (the same relative paths as the server's).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone


def _open(args):
    from lorafleet.ftapi.files import FileStore
    from lorafleet.serve.config import load_serve_config
    from lorafleet.serve.registry import Registry

    cfg = load_serve_config(args.config).absolute()
    registry = Registry(cfg.registry_url())
    return registry, FileStore(registry.engine, cfg.state_path() / "files", cfg.files)


def _files(args) -> int:
    from lorafleet.serve.errors import OpenAIError

    registry, store = _open(args)
    try:
        names, scope = _tenant_scope(registry, getattr(args, "tenant", None))
        if args.files_command == "list":
            records, _ = store.list(scope, limit=10**9, order="asc")
        else:
            records = [store.delete(None, args.file_id) if args.files_command == "delete" else store.get(None, args.file_id)]
    except OpenAIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    cards = [{**r.openai(), "tenant": _owner(names, r), "sha256": r.sha256, "path": str(store.path(r))} for r in records]
    if args.files_command == "delete":
        print(f"deleted {cards[0]['id']} ({cards[0]['filename']}, {cards[0]['bytes']} bytes) of tenant {cards[0]['tenant']}")
    elif args.json or args.files_command == "show":
        print(json.dumps(cards if args.files_command == "list" else cards[0], indent=2))
    else:
        _table(cards, [("file", "id", "30"), ("tenant", "tenant", "16"), ("bytes", "bytes", ">12"), ("created", "created_at", "16"),
                       ("filename", "filename", "")])
    return 0


def add_file_commands(sub) -> None:
    f = sub.add_parser("files", help="tenants' training files (/v1/files) on a server's registry and state dir").add_subparsers(
        dest="files_command", required=True)

    def common(p):
        p.add_argument("--config", required=True, help="the server's Serve YAML (its tenancy.registry_url / state_dir)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_files)
        return p

    ls = common(f.add_parser("list", help="every tenant's files (or --tenant's), oldest first"))
    ls.add_argument("--tenant", help="only this tenant's files")
    common(f.add_parser("show", help="one file's record and where its content lies")).add_argument("file_id")
    common(f.add_parser("delete", help="delete a file: its record and its content")).add_argument("file_id")


def _owner(names: dict, record) -> str:
    return names.get(record.tenant_id, f"(deleted tenant {record.tenant_id})")


def _table(cards: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``cards`` as a text table: one (header, key, format spec) per column; ``created_at`` as a UTC time, None as '-'."""
    def cell(card, key):
        value = card[key]
        if key == "created_at":
            return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M")
        return "-" if value is None else value

    print(" ".join(f"{header:{spec}}" for header, _, spec in columns).rstrip())
    for card in cards:
        print(" ".join(f"{cell(card, key):{spec}}" for _, key, spec in columns).rstrip())


def _tenant_scope(registry, name):
    """(tenant names by id, the id of tenant ``name`` or None for all); exits with an error for an unknown name."""
    names = {t.id: t.name for t, _, _ in registry.list_tenants()}
    if not name:
        return names, None
    scope = next((i for i, n in names.items() if n == name), None)
    if scope is None:
        raise SystemExit(f"error: no tenant named {name!r} (lorafleet tenants list)")
    return names, scope


def _jobs(args) -> int:
    from lorafleet.ftapi.jobs import JobStore
    from lorafleet.serve.config import load_serve_config
    from lorafleet.serve.errors import OpenAIError
    from lorafleet.serve.registry import Registry

    registry = Registry(load_serve_config(args.config).absolute().registry_url())
    store = JobStore(registry.engine)
    try:
        names, scope = _tenant_scope(registry, getattr(args, "tenant", None))
        if args.jobs_command == "list":
            records, _ = store.list(scope, limit=10**9, order="asc")
        else:
            records = [store.cancel(None, args.job_id) if args.jobs_command == "cancel" else store.get(None, args.job_id)]
        events = store.events(None, args.job_id, limit=10**9)[0] if args.jobs_command == "show" else []
    except OpenAIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    owner = {r.id: _owner(names, r) for r in records}
    cards = [{**r.openai(owner[r.id]), "tenant": owner[r.id], "ray_submission_id": r.ray_submission_id, "mlflow_run_id": r.mlflow_run_id,
              "cancel_requested_at": r.cancel_requested_at} for r in records]
    if args.jobs_command == "show":
        print(json.dumps({**cards[0], "config": records[0].config, "events": [e.openai() for e in events]}, indent=2))
    elif args.jobs_command == "cancel":
        c = cards[0]
        print(f"{c['id']} of tenant {c['tenant']}: {c['status']}" + (" (stopping its training run)" if c["status"] == "running" else ""))
    elif args.json:
        print(json.dumps(cards, indent=2))
    else:
        _table(cards, [("job", "id", "31"), ("tenant", "tenant", "16"), ("status", "status", "16"), ("created", "created_at", "16"),
                       ("fine-tuned model", "fine_tuned_model", "")])
    return 0


def add_job_commands(sub) -> None:
    j = sub.add_parser("jobs", help="tenants' fine-tuning jobs (/v1/fine_tuning/jobs) on a server's registry").add_subparsers(
        dest="jobs_command", required=True)

    def common(p):
        p.add_argument("--config", required=True, help="the server's Serve YAML (its tenancy.registry_url / state_dir)")
        p.set_defaults(func=_jobs)
        return p

    ls = common(j.add_parser("list", help="every tenant's jobs (or --tenant's), oldest first"))
    ls.add_argument("--tenant", help="only this tenant's jobs")
    ls.add_argument("--json", action="store_true")
    common(j.add_parser("show", help="one job (JSON): its record, pinned config and events")).add_argument("job_id")
    common(j.add_parser("cancel", help="cancel a job (one not started ends cancelled at once)")).add_argument("job_id")
