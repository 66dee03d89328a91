"""Per-tenant source rules (``tenancy.tenant_models`` / ``tenant_local_roots``): with them set, a
tenant can serve only the registered models and folders that are its own, so no tenant can
register (and then call) an adapter another tenant trained.

The adapter management of the real ``Tenancy`` (what the HTTP routes call: the same registry,
the same store, the same checks) is driven directly, on a real SQLite registry, a real MLflow
registry and real folders with symlinks: neither Ray Serve nor vLLM takes part in these rules,
and the HTTP mapping of their errors is covered by test_tenants.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from lorafleet.serve.errors import OpenAIError
from serve_helpers import BASE
from testutils import record_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(serve_assets, mlflow_adapter, tmp_path_factory):
    """Two tenants, each with an MLflow model and a folder of its own, on a server with both rules set."""
    from mlflow import MlflowClient

    from lorafleet.serve.config import ServeConfig
    from lorafleet.serve.tenancy import Caller, Tenancy

    uri, _, _ = mlflow_adapter
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("tenant-sources")
    models = {}
    for tenant, adapter in [("acme", "alpha"), ("globex", "beta")]:
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(serve_assets.adapters[adapter]), artifact_path="adapter")
        client.set_terminated(run.info.run_id)
        client.create_registered_model(f"{tenant}~intent")
        mv = client.create_model_version(f"{tenant}~intent", source=f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
        client.set_registered_model_alias(f"{tenant}~intent", "prod", mv.version)
        models[tenant] = f"models:/{tenant}~intent/{mv.version}"

    root = tmp_path_factory.mktemp("tenant-roots")
    folders = {}
    for tenant, adapter in [("acme", "alpha"), ("globex", "beta")]:
        folders[tenant] = shutil.copytree(serve_assets.adapters[adapter], root / tenant / "intent")
    (root / "shared").mkdir()
    folders["shared"] = shutil.copytree(serve_assets.adapters["gamma"], root / "shared" / "intent")

    cfg = ServeConfig(model=str(serve_assets.base), served_model_name=BASE, allowed_local_roots=[str(root)], mlflow_tracking_uri=uri,
                      adapter_cache_dir=str(tmp_path_factory.mktemp("tenant-sources-cache")),
                      engine={"max_lora_rank": 8},
                      tenancy={"state_dir": str(tmp_path_factory.mktemp("tenant-sources-state")),
                               "tenant_models": ["{tenant}~*"], "tenant_local_roots": [str(root / "{tenant}")]})
    tenancy = Tenancy(cfg)
    callers = {}
    for tenant in ("acme", "globex"):
        key = asyncio.run(tenancy.create_tenant({"name": tenant}))["api_key"]["key"]
        callers[tenant] = asyncio.run(tenancy.caller(f"Bearer {key}"))
    assert all(isinstance(c, Caller) and c.tenant for c in callers.values())
    return {"tenancy": tenancy, "callers": callers, "models": models, "folders": folders, "root": root}


def register(world, tenant: str, name: str, source: str) -> dict:
    return asyncio.run(world["tenancy"].register(world["callers"][tenant], {"name": name, "source": source}))


def refused(world, tenant: str, name: str, source: str) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        register(world, tenant, name, source)
    return info.value


def test_a_tenant_serves_its_own_model_and_folder(world):
    assert register(world, "acme", "mine-mlflow", world["models"]["acme"])["version"] == 1
    assert register(world, "acme", "mine-alias", "models:/acme~intent@prod")["version"] == 1
    assert register(world, "acme", "mine-local", str(world["folders"]["acme"]))["version"] == 1
    replaced = asyncio.run(world["tenancy"].replace(world["callers"]["acme"], "mine-local", {"source": world["models"]["acme"]}))
    assert replaced["version"] == 2


def test_another_tenants_model_or_folder_is_refused(world):
    """Every way into the other tenant's adapter: its model by version and by alias, an unscoped
    model, its folder directly, through `..`, through a symlink in one's own folder, a folder
    outside every tenant's, and a replace of one's own adapter with the other's source."""
    globex_folder, acme_root = world["folders"]["globex"], world["root"] / "acme"
    (acme_root / "link-to-globex").symlink_to(globex_folder, target_is_directory=True)
    inner = shutil.copytree(world["folders"]["acme"], acme_root / "inner-link")
    os.remove(inner / "adapter_model.safetensors")
    (inner / "adapter_model.safetensors").symlink_to(globex_folder / "adapter_model.safetensors")
    attempts = {
        "other's model by version": world["models"]["globex"],
        "other's model by alias": "models:/globex~intent@prod",
        "unscoped model": "models:/serve-test-delta/1",
        "prefix trick": "models:/acme/1",
        "a longer tenant name's model": "models:/acme-corp~intent/1",
        "other's folder": str(globex_folder),
        "dot-dot out of own folder": str(acme_root / ".." / "globex" / "intent"),
        "symlinked folder": str(acme_root / "link-to-globex"),
        "symlinked weights": str(inner),
        "shared folder outside every tenant's": str(world["folders"]["shared"]),
        "missing folder of the other": str(world["root"] / "globex" / "does-not-exist"),
    }
    codes = {}
    for i, (what, source) in enumerate(attempts.items()):
        err = refused(world, "acme", f"steal-{i}", source)
        assert err.status == 403, (what, err.status, err.message)
        assert "Traceback" not in err.message and ("outside" in err.message or "is not one tenant 'acme' may serve" in err.message), (what, err.message)
        codes[what] = err.code
    # a refusal for a missing folder of the other tenant looks like any other: existence is not revealed
    assert codes["missing folder of the other"] == codes["other's folder"] == "path_not_allowed"
    assert {codes[k] for k in attempts if k.startswith(("other's model", "unscoped", "prefix", "a longer"))} == {"source_not_allowed"}

    register(world, "acme", "kept", world["models"]["acme"])
    with pytest.raises(OpenAIError) as info:
        asyncio.run(world["tenancy"].replace(world["callers"]["acme"], "kept", {"source": str(globex_folder)}))
    err = info.value
    assert err.status == 403
    adapters = asyncio.run(world["tenancy"].list(world["callers"]["acme"]))["data"]
    kept = next(a for a in adapters if a["id"] == "kept")
    assert kept["version"] == 1 and kept["source"] == world["models"]["acme"]  # the live adapter is unaffected
    assert not any(a["id"].startswith("steal-") for a in adapters)
    # the other tenant, under the same rules, can serve its own
    assert register(world, "globex", "mine", str(globex_folder))["version"] == 1
    record_scenario("security", "per-tenant sources (tenant_models, tenant_local_roots)", bad_inputs=f"{len(attempts) + 1} registrations of "
                    "another tenant's model (version, alias), unscoped models, its folder (direct, `..`, symlinked folder, symlinked "
                    "weights), folders outside every tenant's, a replace with another's source",
                    outcome=f"all {len(attempts) + 1} refused with 403; own models and folders served; the live adapter unchanged",
                    attempts=len(attempts) + 1, refused=len(attempts) + 1)


def test_rules_must_be_per_tenant():
    from lorafleet.config.base import ConfigError, validate_config
    from lorafleet.serve.config import ServeConfig

    # not per tenant at all, or ambiguous: acme's `{tenant}-*` matches acme-corp's models, `/srv/{tenant}-x` is not a whole folder
    bad_models, bad_roots = ["acme-*", "{tenant}-*", "*{tenant}~*", "{tenant}*"], ["/srv/adapters", "/srv/{tenant}-x"]
    with pytest.raises(ConfigError) as info:
        validate_config(ServeConfig, {"model": "m", "tenancy": {"tenant_models": bad_models, "tenant_local_roots": bad_roots}})
    message = str(info.value)
    assert all(repr(b) in message for b in bad_models + bad_roots), message
    ok = ServeConfig(model="m", allowed_local_roots=["/srv"], tenancy={"tenant_models": ["{tenant}~*", "team.{tenant}", "{tenant}"],
                                                                      "tenant_local_roots": ["/srv/{tenant}/adapters"]})
    assert ok.tenancy.scoped_models("acme") == ["acme~*", "team.acme", "acme"]
    with pytest.raises(ValueError) as info:
        ServeConfig(model="m", tenancy={"tenant_local_roots": ["/srv/{tenant}"]})
    assert "allowed_local_roots is empty" in str(info.value)
