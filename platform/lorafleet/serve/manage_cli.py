"""``lorafleet tenants ...`` (the registry, directly) and ``lorafleet adapters register|replace|...`` (a running server).

Tenants are managed on the registry itself, so they work with or without a server running;
a running server sees the change within ``tenancy.poll_interval_s``::

    lorafleet tenants create acme --config serve/tiny-cpu.yaml [--rpm 600 --tpm 200000 ...]
    lorafleet tenants list --config serve/tiny-cpu.yaml
    lorafleet tenants add-key acme --config ...
    lorafleet tenants revoke-key <key id> --config ...
    lorafleet tenants delete acme --config ...

(``--registry-url`` instead of ``--config`` names the store directly.) Adapters are a
tenant's own and go through the server's API with the tenant's key
(``$LORAFLEET_API_KEY`` or ``--api-key``)::

    lorafleet adapters register intent-v1 --source models:/banking77-intent/3 --server http://127.0.0.1:8000 [--pin]
    lorafleet adapters status [intent-v1] --server ...
    lorafleet adapters replace intent-v1 --source /srv/adapters/intent-v2 --server ...
    lorafleet adapters pin intent-v1 [--off] --server ...
    lorafleet adapters delete intent-v1 --server ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

QUOTA_FLAGS = {"max_adapters": "--max-adapters", "requests_per_minute": "--rpm", "tokens_per_minute": "--tpm",
               "max_concurrent_requests": "--max-concurrent"}


def _registry(args):
    from lorafleet.serve.config import load_serve_config
    from lorafleet.serve.registry import Registry

    if args.registry_url:
        return Registry(args.registry_url)
    if not args.config:
        raise ValueError("give --config (the server's Serve YAML) or --registry-url")
    return Registry(load_serve_config(args.config).absolute().registry_url())


def _when(ts) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _tenants(args) -> int:
    from lorafleet.serve.registry import RegistryError

    reg = _registry(args)
    try:
        if args.tenants_command == "create":
            quotas = {f: getattr(args, f) for f in QUOTA_FLAGS if getattr(args, f) is not None}
            tenant, key = reg.create_tenant(args.name, allow_base=not args.no_base, quotas=quotas, key_label=args.label)
            print(f"created tenant {tenant.name} (quotas: {tenant.quotas or 'server defaults'}; base model: {'yes' if tenant.allow_base else 'no'})")
            print(f"API key (shown once, store it now): {key.secret}", flush=True)
        elif args.tenants_command == "add-key":
            key = reg.create_key(args.name, args.label)
            print(f"API key {key.id} for {args.name} (shown once, store it now): {key.secret}")
        elif args.tenants_command == "revoke-key":
            key = reg.revoke_key(args.key_id)
            print(f"revoked key {key.id} (at {_when(key.revoked_at)})")
        elif args.tenants_command == "delete":
            adapters = reg.delete_tenant(args.name)
            print(f"deleted tenant {args.name}, its keys and {len(adapters)} adapter(s): {', '.join(a.name for a in adapters) or '-'}")
        else:
            rows = reg.list_tenants()
            if args.json:
                print(json.dumps([{**t.public(), "adapters": n, "keys": [k.public() for k in keys]} for t, keys, n in rows], indent=2))
                return 0
            print(f"{'tenant':24} {'adapters':>8}  {'keys (active/all)':>17}  {'base':5} quotas")
            for t, keys, n in rows:
                active = sum(k.revoked_at is None for k in keys)
                print(f"{t.name:24} {n:>8}  {f'{active}/{len(keys)}':>17}  {'yes' if t.allow_base else 'no':5} {t.quotas or 'defaults'}")
    except RegistryError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        reg.close()
    return 0


def _adapters_api(args) -> int:
    import httpx

    key = args.api_key or os.environ.get("LORAFLEET_API_KEY")
    if not key:
        print("error: give --api-key or set LORAFLEET_API_KEY (a tenant's key from `lorafleet tenants create`)", file=sys.stderr)
        return 2
    url = args.server.rstrip("/")
    cmd = args.adapters_command
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=args.timeout) as client:
        if cmd == "register":
            r = client.post("/v1/adapters", json={"name": args.name, "source": args.source, "pin": args.pin})
        elif cmd == "replace":
            body = {"source": args.source, **({"pin": True} if args.pin else {})}
            r = client.put(f"/v1/adapters/{args.name}", json=body)
        elif cmd == "pin":
            r = client.patch(f"/v1/adapters/{args.name}", json={"pin": not args.off})
        elif cmd == "delete":
            r = client.delete(f"/v1/adapters/{args.name}")
        else:
            r = client.get(f"/v1/adapters/{args.name}" if args.name else "/v1/adapters")
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            print(f"error: {r.status_code} {err.get('code')}: {err.get('message')}", file=sys.stderr)
        except (ValueError, KeyError):
            print(f"error: {r.status_code}: {r.text[:500]}", file=sys.stderr)
        return 1
    body = r.json()
    if args.json or cmd == "delete":
        print(json.dumps(body, indent=2))
        return 0
    cards = body.get("data", [body]) if isinstance(body, dict) else body
    print(f"{'adapter':28} {'version':>7} {'state':10} {'pinned':6} {'rank':>4} {'MB':>7}  {'last used':16} source")
    for c in cards:
        print(f"{c['id']:28} {c['version']:>7} {c['state']:10} {'yes' if c['pinned'] else 'no':6} {c['rank']:>4} "
              f"{c['size_bytes'] / 1e6:>7.1f}  {_when(c.get('last_used_at')):16} {c['source']}")
    return 0


def add_tenant_commands(sub) -> None:
    t = sub.add_parser("tenants", help="tenants and API keys of a server's registry").add_subparsers(dest="tenants_command", required=True)

    def common(p):
        p.add_argument("--config", help="the server's Serve YAML (its tenancy.registry_url / state_dir)")
        p.add_argument("--registry-url", help="SQLAlchemy URL of the registry (instead of --config)")
        p.set_defaults(func=_tenants)
        return p

    c = common(t.add_parser("create", help="create a tenant and print its first API key (once)"))
    c.add_argument("name")
    c.add_argument("--no-base", action="store_true", help="the tenant may not call the base model itself")
    c.add_argument("--label", help="a label for the key")
    for field, flag in QUOTA_FLAGS.items():
        c.add_argument(flag, dest=field, type=int, help=f"{field} (default: the server's tenancy.quotas)")
    ls = common(t.add_parser("list", help="tenants, their keys and adapter counts (never the keys themselves)"))
    ls.add_argument("--json", action="store_true")
    k = common(t.add_parser("add-key", help="a further API key for a tenant (printed once)"))
    k.add_argument("name")
    k.add_argument("--label")
    r = common(t.add_parser("revoke-key", help="revoke a key by its id (the 12 hex digits after lfk_) or the whole key"))
    r.add_argument("key_id")
    d = common(t.add_parser("delete", help="delete a tenant with its keys and adapters"))
    d.add_argument("name")


def add_adapter_api_commands(a) -> None:
    """Subcommands of ``lorafleet adapters`` that talk to a running server."""

    def common(p: argparse.ArgumentParser):
        p.add_argument("--server", default=os.environ.get("LORAFLEET_SERVER", "http://127.0.0.1:8000"), help="server URL (default $LORAFLEET_SERVER or http://127.0.0.1:8000)")
        p.add_argument("--api-key", help="the tenant's key (default $LORAFLEET_API_KEY)")
        p.add_argument("--timeout", type=float, default=600, help="seconds (registering downloads and checks the adapter)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_adapters_api)
        return p

    reg = common(a.add_parser("register", help="register an adapter on a running server (POST /v1/adapters)"))
    reg.add_argument("name")
    reg.add_argument("--source", required=True, help="models:/<name>/<version>, models:/<name>@<alias>, or an absolute folder inside the server's allowed roots")
    reg.add_argument("--pin", action="store_true", help="keep it in a GPU slot for good")
    rep = common(a.add_parser("replace", help="replace an adapter with a new version, atomically (PUT /v1/adapters/NAME)"))
    rep.add_argument("name")
    rep.add_argument("--source", required=True)
    rep.add_argument("--pin", action="store_true")
    pin = common(a.add_parser("pin", help="pin (or --off: unpin) an adapter"))
    pin.add_argument("name")
    pin.add_argument("--off", action="store_true")
    dl = common(a.add_parser("delete", help="unload and deregister an adapter"))
    dl.add_argument("name")
    st = common(a.add_parser("status", help="your adapters on the server with their state (GET /v1/adapters)"))
    st.add_argument("name", nargs="?")
