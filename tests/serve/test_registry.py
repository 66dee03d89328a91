"""The tenant / key / adapter registry on both of its stores (SQLite, the embedded default, and
PostgreSQL, what a cluster uses), its quotas and the `lorafleet tenants` CLI. No server needed."""

from __future__ import annotations

import threading

import pytest

from lorafleet.cli import main as lorafleet
from lorafleet.serve.quotas import QuotaLimiter, RateLimited
from lorafleet.serve.registry import (
    RUNTIME_LORA_ID_BASE,
    AdapterVersion,
    Conflict,
    NotFound,
    Registry,
    RegistryError,
)
from lorafleet.serve.registry_view import RegistryView


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/state/registry.db"
    else:
        url = request.getfixturevalue("postgres_db")
    reg = Registry(url)
    yield reg
    reg.close()


def version(tag: str) -> AdapterVersion:
    return AdapterVersion(source=f"/srv/adapters/{tag}", path=f"/cache/{tag}", content_hash=tag.ljust(64, "0"), rank=8, size_bytes=1234)


def test_keys_are_random_shown_once_stored_hashed_and_revocable(registry):
    tenant, key = registry.create_tenant("acme")
    other, other_key = registry.create_tenant("globex")
    assert key.secret != other_key.secret and key.secret.startswith("lfk_") and len(key.secret) > 70
    assert registry.authenticate(key.secret).name == "acme" and registry.authenticate(other_key.secret).name == "globex"
    stored = registry.list_tenants()[0][1][0]
    assert key.secret not in (stored.digest, stored.salt) and stored.id == key.id
    for wrong in ["", "nonsense", key.secret[:-1], key.secret.replace(key.id, other_key.id)]:
        assert registry.authenticate(wrong) is None
    second = registry.create_key("acme", "ci")
    registry.revoke_key(key.id)
    assert registry.authenticate(key.secret) is None and registry.authenticate(second.secret).name == "acme"
    with pytest.raises(NotFound):
        registry.revoke_key(second.id, tenant="globex")  # one tenant's name cannot revoke another's key
    with pytest.raises(Conflict):
        registry.create_tenant("acme")
    with pytest.raises(RegistryError, match="invalid"):
        registry.create_tenant("Not A Name")


def test_adapters_are_scoped_per_tenant_and_versions_get_fresh_engine_ids(registry):
    acme, _ = registry.create_tenant("acme")
    globex, _ = registry.create_tenant("globex")
    a = registry.add_adapter(acme.id, "intent-v1", version("a1"))
    b = registry.add_adapter(globex.id, "intent-v1", version("b1"))  # same name, other tenant: fine
    assert a.lora_id != b.lora_id and min(a.lora_id, b.lora_id) > RUNTIME_LORA_ID_BASE
    with pytest.raises(Conflict, match="already exists"):
        registry.add_adapter(acme.id, "intent-v1", version("a2"))
    old, new = registry.replace_adapter(acme.id, "intent-v1", version("a2"))
    assert (old.version, new.version) == (1, 2) and new.lora_id not in (a.lora_id, b.lora_id) and new.source.endswith("a2")
    with pytest.raises(Conflict, match="version 2, not 1"):  # compare-and-set
        registry.replace_adapter(acme.id, "intent-v1", version("a3"), expected_version=1)
    assert registry.adapter(globex.id, "intent-v1").source.endswith("b1")  # untouched
    deleted = registry.delete_adapter(acme.id, "intent-v1")
    assert deleted.version == 2 and registry.adapter(acme.id, "intent-v1") is None
    again = registry.add_adapter(acme.id, "intent-v1", version("a4"))
    assert again.version == 1 and again.lora_id > new.lora_id  # ids are never reused
    with pytest.raises(NotFound):
        registry.delete_adapter(acme.id, "missing")


def test_quota_and_pin_limits_are_409(registry):
    acme, _ = registry.create_tenant("acme", quotas={"max_adapters": 2})
    registry.add_adapter(acme.id, "one", version("1"), pinned=True, max_pinned=1)
    registry.add_adapter(acme.id, "two", version("2"))
    with pytest.raises(Conflict) as caught:
        registry.add_adapter(acme.id, "three", version("3"), max_adapters=2)
    assert caught.value.code == "adapter_quota_exceeded"
    with pytest.raises(Conflict) as caught:
        registry.set_pinned(acme.id, "two", True, max_pinned=1)
    assert caught.value.code == "pin_limit_reached" and "at most 1" in caught.value.message
    registry.set_pinned(acme.id, "one", False)
    assert registry.set_pinned(acme.id, "two", True, max_pinned=1).pinned


def test_concurrent_replacements_of_one_name_serialise(registry):
    acme, _ = registry.create_tenant("acme")
    registry.add_adapter(acme.id, "hot", version("v1"))
    outcomes = []

    def replace(tag):
        try:
            outcomes.append(registry.replace_adapter(acme.id, "hot", version(tag), expected_version=1)[1].version)
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=replace, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [2, "conflict", "conflict", "conflict"]


def test_a_view_sees_changes_by_generation_and_tells_which_keys_to_look_up(registry):
    acme, key = registry.create_tenant("acme")
    view = RegistryView(registry)
    other = Registry(registry.url)  # another replica writing
    try:
        late = other.create_key("acme")
        assert view.snapshot.authenticate(late.secret) is None and view.unknown_key(late.secret)  # only the store knows it yet
        assert registry.authenticate(late.secret).name == "acme"
        other.add_adapter(acme.id, "new", version("n"))
        assert (acme.id, "new") not in view.snapshot.adapters
        other.revoke_key(key.id)
        assert view.snapshot.authenticate(key.secret) is not None and not view.unknown_key(key.secret)  # known: answered until the poll
        assert view.refresh() is True and view.snapshot.authenticate(key.secret) is None
        assert not view.unknown_key(late.secret) and view.snapshot.adapters[(acme.id, "new")].name == "new"
        assert view.refresh() is False  # nothing moved
    finally:
        other.close()


def test_deleting_a_tenant_removes_its_keys_and_adapters(registry):
    acme, key = registry.create_tenant("acme")
    registry.add_adapter(acme.id, "a", version("a"))
    assert [a.name for a in registry.delete_tenant("acme")] == ["a"]
    assert registry.authenticate(key.secret) is None and registry.adapters() == [] and registry.list_tenants() == []


def test_replica_state_rows_expire(registry):
    registry.publish_replica_state("r1", {"cpu": [1], "gpu": []})
    registry.publish_replica_state("r1", {"cpu": [1, 2], "gpu": [2]})
    assert registry.replica_states(max_age_s=60) == {"r1": {"cpu": [1, 2], "gpu": [2]}}
    assert registry.replica_states(max_age_s=-1) == {}


def test_quota_limiter_rates_and_concurrency():
    limiter = QuotaLimiter(shares=1)
    quotas = {"requests_per_minute": 2, "tokens_per_minute": None, "max_concurrent_requests": 2}
    first, second = limiter.admit(1, quotas), limiter.admit(1, quotas)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(1, {**quotas, "requests_per_minute": None})
    assert caught.value.code == "concurrency_limit_exceeded"
    first.release()
    second.release()
    with pytest.raises(RateLimited) as caught:
        limiter.admit(1, quotas)
    assert caught.value.code == "rate_limit_exceeded" and 1 <= caught.value.retry_after_s <= 30
    limiter.admit(2, quotas).release()  # another tenant is unaffected
    tokens = {"tokens_per_minute": 100}
    with limiter.admit(3, tokens) as ticket:
        ticket.tokens = 150  # over the budget: the next request waits until the minute refills it
    with pytest.raises(RateLimited) as caught:
        limiter.admit(3, tokens)
    assert caught.value.retry_after_s >= 30


def test_tenants_cli(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/registry.db"
    assert lorafleet(["tenants", "create", "acme", "--registry-url", url, "--rpm", "60"]) == 0
    out = capsys.readouterr().out
    secret = out.split("store it now): ")[1].split()[0]
    reg = Registry(url)
    try:
        assert reg.authenticate(secret).quotas == {"requests_per_minute": 60}
        assert lorafleet(["tenants", "list", "--registry-url", url]) == 0
        listing = capsys.readouterr().out
        assert "acme" in listing and secret not in listing
        assert lorafleet(["tenants", "revoke-key", secret, "--registry-url", url]) == 0
        assert reg.authenticate(secret) is None
        assert lorafleet(["tenants", "delete", "nobody", "--registry-url", url]) == 1
        assert "no tenant named 'nobody'" in capsys.readouterr().err
        assert lorafleet(["tenants", "delete", "acme", "--registry-url", url]) == 0 and reg.list_tenants() == []
    finally:
        reg.close()
