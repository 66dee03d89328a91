"""Tenants, keys, quotas and runtime adapters (hot-swap) on the session's real app: Ray Serve,
two vLLM engine replicas, a SQLite registry, real HTTP and the ``openai`` client.

Two tenants, ``acme`` and ``globex``, are created through the admin API. Each registers its
own ``intent-v1`` from a local folder (the decisive adapters of serve_assets: each answers
with its own phrase, so the version that answered is obvious from the text). Tests run in
file order and build on each other; the last one restarts the whole app.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import httpx
import pytest

from serve_helpers import ADMIN_KEY, BASE, MAX_NEW_TOKENS, TARGETS
from testutils import record_scenario

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS: dict[str, str] = {}  # tenant -> its API key (filled by the first test)


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client
    # The last module that needs the session's app: stop it now, so that the test modules
    # after this one (training, sweeps) get the machine's CPUs and memory back.
    served.close()


def complete(http, headers: dict, model: str, prompt: str) -> httpx.Response:
    return http.post("/v1/completions", headers=headers,
                     json={"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0})


def answer(http, tenant: str, model: str, prompt: str) -> str:
    r = complete(http, auth(tenant), model, prompt)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def phrase_of(assets, text: str, prompt: str) -> str:
    """Which of the decisive adapters (or the base) produced ``text`` for ``prompt``."""
    matches = [name for name in ["base", *TARGETS] if assets.expected_text[name][prompt] == text]
    assert len(matches) == 1, (text, {n: assets.expected_text[n][prompt] for n in ["base", *TARGETS]})
    return matches[0]


def error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def engine_states(http) -> dict:
    r = http.get("/admin/engines", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["replicas"]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


# --------------------------------------------------------------------------- tenants and keys


def test_admin_creates_tenants_and_keys_are_shown_once(http, served):
    assert error(http.post("/admin/tenants", json={"name": "acme"}), 401)["code"] == "invalid_api_key"
    for name, quotas in [("acme", {}), ("globex", {"max_adapters": 2})]:
        r = http.post("/admin/tenants", headers=ADMIN, json={"name": name, "quotas": quotas})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["tenant"]["name"] == name and body["api_key"]["key"].startswith("lfk_")
        KEYS[name] = body["api_key"]["key"]
    error(http.post("/admin/tenants", headers=ADMIN, json={"name": "acme"}), 409, "tenant_exists")
    error(http.post("/admin/tenants", headers=ADMIN, json={"name": "Bad Name!"}), 400)
    listed = http.get("/admin/tenants", headers=ADMIN).json()["data"]
    assert {t["name"] for t in listed} >= {"acme", "globex"}
    # the key is never shown again: listings carry key ids only, and the store keeps a salted hash
    assert KEYS["acme"] not in json.dumps(listed) and all(set(k) == {"id", "label", "created_at", "revoked_at"} for t in listed for k in t["keys"])
    import sqlalchemy as sa

    engine = sa.create_engine(served.cfg.registry_url())
    with engine.connect() as conn:
        dump = json.dumps([list(map(str, row)) for row in conn.execute(sa.text("SELECT * FROM lorafleet_api_keys"))])
    engine.dispose()
    assert KEYS["acme"] not in dump and KEYS["acme"].split("_")[2] not in dump
    # a tenant key is not an admin key, and the admin key is not a tenant key
    error(http.get("/admin/tenants", headers=auth("acme")), 403, "not_admin")
    error(complete(http, ADMIN, BASE, "hello"), 403, "admin_key_not_allowed")


def test_missing_or_bad_keys_are_401(http):
    error(http.get("/v1/adapters"), 401, "invalid_api_key")
    r = complete(http, {"Authorization": "Bearer lfk_000000000000_" + "0" * 64}, BASE, "hi")
    assert error(r, 401, "invalid_api_key") and r.headers["www-authenticate"] == "Bearer"
    error(complete(http, {"Authorization": "Basic abc"}, BASE, "hi"), 401)
    error(complete(http, {"Authorization": KEYS["acme"][:-1] + ("0" if KEYS["acme"][-1] != "0" else "1")}, BASE, "hi"), 401)


# --------------------------------------------------------------------------- register, isolation


def test_each_tenant_registers_its_own_intent_v1(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    for tenant, adapter in [("acme", "alpha"), ("globex", "beta")]:
        r = http.post("/v1/adapters", headers=auth(tenant), json={"name": "intent-v1", "source": str(serve_assets.adapters[adapter])})
        assert r.status_code == 201, r.text
        card = r.json()
        assert (card["id"], card["owner"], card["version"], card["rank"], card["state"]) == ("intent-v1", tenant, 1, 8, "registered")
    assert phrase_of(serve_assets, answer(http, "acme", "intent-v1", prompt), prompt) == "alpha"
    assert phrase_of(serve_assets, answer(http, "globex", "intent-v1", prompt), prompt) == "beta"
    # the explicit scope works for one's own adapter
    assert phrase_of(serve_assets, answer(http, "acme", "acme/intent-v1", prompt), prompt) == "alpha"
    error(http.post("/v1/adapters", headers=auth("acme"), json={"name": "intent-v1", "source": str(serve_assets.adapters["gamma"])}),
          409, "adapter_exists")
    error(http.post("/v1/adapters", headers=auth("acme"), json={"name": "alpha", "source": str(serve_assets.adapters["gamma"])}),
          409, "name_reserved")


def test_isolation_matrix(http, serve_assets):
    prompt = serve_assets.prompts[0]
    acme, globex = auth("acme"), auth("globex")
    # listing: each sees only its own adapters (plus the base and the shared ones in /v1/models)
    assert [a["id"] for a in http.get("/v1/adapters", headers=acme).json()["data"]] == ["intent-v1"]
    assert http.get("/v1/adapters", headers=acme).json()["data"][0]["owner"] == "acme"
    models = {m["id"] for m in http.get("/v1/models", headers=acme).json()["data"]}
    assert "intent-v1" in models and BASE in models and not any(m.startswith("globex") for m in models)
    anonymous = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "intent-v1" not in anonymous and BASE in anonymous
    # calling another tenant's adapter: the same 404 as a name that does not exist
    missing = error(complete(http, acme, "globex/intent-v1", prompt), 404, "model_not_found")["message"]
    nowhere = error(complete(http, acme, "globex/no-such-adapter", prompt), 404, "model_not_found")["message"]
    assert missing.replace("globex/intent-v1", "X") == nowhere.replace("globex/no-such-adapter", "X")
    error(complete(http, {}, "intent-v1", prompt), 404, "model_not_found")  # anonymous callers see no tenant's adapters
    error(http.get("/v1/adapters/globex/intent-v1", headers=acme), 404)
    # managing another tenant's adapter: 403, whether or not it exists
    for name in ("globex/intent-v1", "globex/no-such-adapter"):
        error(http.put(f"/v1/adapters/{name}", headers=acme, json={"source": str(serve_assets.adapters["gamma"])}), 403, "not_your_adapter")
        error(http.delete(f"/v1/adapters/{name}", headers=acme), 403, "not_your_adapter")
        error(http.patch(f"/v1/adapters/{name}", headers=acme, json={"pin": True}), 403, "not_your_adapter")
    # the other endpoints that name a model: chat and streaming, the same 404
    chat = {"model": "globex/intent-v1", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    error(http.post("/v1/chat/completions", headers=acme, json=chat), 404, "model_not_found")
    error(http.post("/v1/completions", headers=acme, json={"model": "globex/intent-v1", "prompt": prompt, "max_tokens": 4, "stream": True}),
          404, "model_not_found")
    # metrics: a tenant's key shows its own adapters' series and nothing of another tenant's
    mine = http.get("/metrics", headers=acme)
    assert mine.status_code == 200 and 'model="acme/intent-v1"' in mine.text and "globex" not in mine.text
    assert "acme/" not in http.get("/metrics").text  # no key: shared models only
    # nothing of globex's changed
    assert phrase_of(serve_assets, answer(http, "globex", "intent-v1", prompt), prompt) == "beta"
    assert http.get("/v1/adapters", headers=globex).json()["data"][0]["version"] == 1
    record_scenario("security", "tenant isolation matrix (list, models, call, chat, stream, get, replace, delete, pin, metrics)",
                    bad_inputs="13 cross-tenant and anonymous requests against another tenant's adapter", lost="nothing",
                    outcome="every one 403/404 with the same message as a name that does not exist; the owner's adapter unchanged")


def test_listing_shows_engine_state_from_the_engines_themselves(http, serve_assets):
    answer(http, "acme", "intent-v1", serve_assets.prompts[1])
    card = wait_for(lambda: (c := http.get("/v1/adapters/intent-v1", headers=auth("acme")).json())["state"] != "registered"
                    and c["last_used_at"] and c, what="the engine to publish that it holds acme/intent-v1")
    assert card["state"] in ("loaded", "active") and card["replicas"]
    holders = [s for r, s in engine_states(http).items() if r in card["replicas"]]
    assert holders and all(card["lora_id"] in s["cpu"] for s in holders)  # what vLLM itself reports (list_loras)


# --------------------------------------------------------------------------- replace and delete


def test_register_call_replace_call_delete_404(http, serve_assets):
    prompt = serve_assets.prompts[2]
    r = http.post("/v1/adapters", headers=auth("acme"), json={"name": "swap", "source": str(serve_assets.adapters["alpha"])})
    assert r.status_code == 201, r.text
    first = complete(http, auth("acme"), "swap", prompt)
    assert first.headers["x-lorafleet-adapter-version"] == "1"
    assert phrase_of(serve_assets, first.json()["choices"][0]["text"], prompt) == "alpha"
    r = http.put("/v1/adapters/swap", headers=auth("acme"), json={"source": str(serve_assets.adapters["gamma"])})
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    new_id = r.json()["lora_id"]
    second = complete(http, auth("acme"), "swap", prompt)
    assert second.headers["x-lorafleet-adapter-version"] == "2"
    assert phrase_of(serve_assets, second.json()["choices"][0]["text"], prompt) == "gamma"
    r = http.delete("/v1/adapters/swap", headers=auth("acme"))
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    error(complete(http, auth("acme"), "swap", prompt), 404, "model_not_found")
    error(http.delete("/v1/adapters/swap", headers=auth("acme")), 404)
    assert "swap" not in {a["id"] for a in http.get("/v1/adapters", headers=auth("acme")).json()["data"]}
    # the engines unload it: vLLM's own list_loras no longer has it (remove_lora frees the GPU slot first)
    wait_for(lambda: all(new_id not in s.get("cpu", []) for s in engine_states(http).values()),
             what=f"lora id {new_id} to leave every engine")


def test_a_replaced_version_leaves_the_engines_once_idle(http, serve_assets):
    prompt = serve_assets.prompts[0]
    r = http.post("/v1/adapters", headers=auth("globex"), json={"name": "short-lived", "source": str(serve_assets.adapters["gamma"])})
    assert r.status_code == 201, r.text
    old_id = r.json()["lora_id"]
    assert complete(http, auth("globex"), "short-lived", prompt).status_code == 200
    wait_for(lambda: any(old_id in s.get("cpu", []) for s in engine_states(http).values()), what="an engine to load it")
    r = http.put("/v1/adapters/short-lived", headers=auth("globex"), json={"source": str(serve_assets.adapters["alpha"])})
    assert r.status_code == 200 and r.json()["lora_id"] != old_id
    wait_for(lambda: all(old_id not in s.get("cpu", []) for s in engine_states(http).values()),
             what=f"the replaced version (lora id {old_id}) to leave every engine")
    assert http.delete("/v1/adapters/short-lived", headers=auth("globex")).status_code == 200


def test_replace_under_load_never_fails_and_answers_with_the_admitted_version(served, serve_assets):
    """A steady stream of requests while the adapter is replaced several times: zero failures, and every
    answer is the output of the version that was live when the request was admitted."""
    prompt = serve_assets.prompts[1]
    sequence = ["alpha", "beta", "gamma", "alpha", "beta"]
    key = auth("acme")

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            r = await client.post("/v1/adapters", headers=key, json={"name": "hot", "source": str(serve_assets.adapters[sequence[0]])})
            assert r.status_code == 201, r.text
            results, swaps, stop = [], [(time.monotonic(), 1)], asyncio.Event()

            async def caller():
                while not stop.is_set():
                    sent = time.monotonic()
                    r = await client.post("/v1/completions", headers=key,
                                          json={"model": "hot", "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0})
                    results.append((sent, r))

            callers = [asyncio.create_task(caller()) for _ in range(3)]
            for version, adapter in enumerate(sequence[1:], start=2):
                await asyncio.sleep(2.0)
                r = await client.put("/v1/adapters/hot", headers=key, json={"source": str(serve_assets.adapters[adapter])})
                assert r.status_code == 200 and r.json()["version"] == version, r.text
                swaps.append((time.monotonic(), version))
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*callers)
            await client.delete("/v1/adapters/hot", headers=key)
            return results, swaps

    results, swaps = asyncio.run(run())
    failures = [(r.status_code, r.text[:200]) for _, r in results if r.status_code != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    seen = set()
    for sent, r in results:
        version = int(r.headers["x-lorafleet-adapter-version"])
        seen.add(version)
        assert phrase_of(serve_assets, r.json()["choices"][0]["text"], prompt) == sequence[version - 1], (version, r.json())
        # admitted after swap k returned -> at least version k
        live_at_send = max(v for at, v in swaps if at <= sent)
        assert version >= live_at_send, (sent, version, swaps)
    assert len(seen) >= 4, f"only versions {sorted(seen)} answered; the test did not exercise the swaps ({len(results)} requests)"
    print(f"\n{len(results)} requests during {len(sequence) - 1} replacements, versions seen {sorted(seen)}, 0 failures")


# --------------------------------------------------------------------------- hostile adapters


def _hostile(served, serve_assets) -> dict[str, tuple[str, int, str]]:
    """name -> (source, expected status, expected code)."""
    import torch
    from safetensors.torch import load_file, save_file

    up, out = served.uploads, served.outside
    alpha = serve_assets.adapters["alpha"]

    def copy(name):
        target = up / name
        shutil.copytree(alpha, target)
        return target

    pickle = copy("pickle")
    torch.save(load_file(str(pickle / "adapter_model.safetensors")), pickle / "adapter_model.bin")
    (pickle / "adapter_model.safetensors").unlink()
    corrupt = copy("corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    shapes = copy("shapes")
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v for k, v in load_file(str(shapes / "adapter_model.safetensors")).items()}
    save_file(tensors, str(shapes / "adapter_model.safetensors"))
    rank = copy("rank")
    cfg = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    wrong_base = copy("wrong-base")
    (wrong_base / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    shutil.copytree(alpha, out / "secret")
    (up / "escape").symlink_to(out / "secret")
    beside = copy("pickle-beside")
    torch.save({"step": 1}, beside / "training_args.bin")  # a pickle next to good safetensors
    optimizer = copy("optimizer-pt")
    torch.save({"state": {}}, optimizer / "optimizer.pt")
    empty_weights = copy("empty-weights")
    (empty_weights / "adapter_model.safetensors").write_bytes(b"")
    empty_config = copy("empty-config")
    (empty_config / "adapter_config.json").write_bytes(b"")
    noise = copy("random-bytes")
    (noise / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    header_bomb = copy("header-bomb")  # a safetensors header claiming 2**40 bytes of JSON
    (header_bomb / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    huge = copy("huge")
    with open(huge / "adapter_model.safetensors", "r+b") as f:
        f.truncate(served.cfg.tenancy.max_adapter_bytes + 1)  # sparse: past the size limit without writing it
    json_configs = {"dora": {**cfg, "use_dora": True}, "not-lora": {**cfg, "peft_type": "PREFIX_TUNING"},
                    "rank-pattern": {**cfg, "rank_pattern": {"q_proj": 64}}, "unknown-module": {**cfg, "target_modules": ["evil_proj"]},
                    "negative-rank": {**cfg, "r": -8}, "config-list": [cfg]}
    for name, content in json_configs.items():
        (copy(name) / "adapter_config.json").write_text(json.dumps(content))
    file_link = copy("file-symlink")
    (file_link / "adapter_model.safetensors").unlink()
    (file_link / "adapter_model.safetensors").symlink_to(out / "secret" / "adapter_model.safetensors")
    return {
        "pickle": (str(pickle), 422, "unsafe_weights_format"),
        "corrupt": (str(corrupt), 422, "corrupt_weights"),
        "shapes": (str(shapes), 422, "shape_mismatch"),
        "rank": (str(rank), 422, "rank_too_large"),
        "wrong-base": (str(wrong_base), 422, "base_model_mismatch"),
        "traversal": (f"{up}/../{out.name}/secret", 403, "path_not_allowed"),
        "outside": (str(out / "secret"), 403, "path_not_allowed"),
        "symlink": (str(up / "escape"), 403, "path_not_allowed"),
        "relative": ("../secret", 400, "invalid_source"),
        "scheme": ("s3://bucket/adapter", 400, "invalid_source"),
        "missing": (str(up / "nope"), 404, "adapter_not_found"),
        "pickle-beside": (str(beside), 422, "unsafe_weights_format"),
        "optimizer-pt": (str(optimizer), 422, "unsafe_weights_format"),
        "empty-weights": (str(empty_weights), 422, "corrupt_weights"),
        "empty-config": (str(empty_config), 422, "invalid_adapter"),
        "random-bytes": (str(noise), 422, "corrupt_weights"),
        "header-bomb": (str(header_bomb), 422, "corrupt_weights"),
        "huge": (str(huge), 413, "adapter_too_large"),
        "dora": (str(up / "dora"), 422, "invalid_adapter"),
        "not-lora": (str(up / "not-lora"), 422, "invalid_adapter"),
        "rank-pattern": (str(up / "rank-pattern"), 422, "rank_too_large"),
        "unknown-module": (str(up / "unknown-module"), 422, "unknown_target_module"),
        "negative-rank": (str(up / "negative-rank"), 422, "invalid_adapter"),
        "config-list": (str(up / "config-list"), 422, "invalid_adapter"),
        "file-symlink": (str(file_link), 403, "path_not_allowed"),
        "system-path": ("/etc", 403, "path_not_allowed"),
        "nul-byte": (f"{up}/alpha\x00.safetensors", 400, "invalid_source"),
        "file-url": ("file:///etc/passwd", 400, "invalid_source"),
    }


def test_hostile_adapters_are_refused_and_nothing_else_is_affected(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    cases = _hostile(served, serve_assets)
    assert len(cases) >= 20
    for name, (source, status, code) in cases.items():
        err = error(http.post("/v1/adapters", headers=auth("acme"), json={"name": f"bad-{name}", "source": source}), status, code)
        assert err["param"] == "source", (name, err)
        # replacing a good adapter with a bad source fails the same way and keeps the good version
        error(http.put("/v1/adapters/intent-v1", headers=auth("acme"), json={"source": source}), status, code)
    listed = http.get("/v1/adapters", headers=auth("acme")).json()["data"]
    assert [(a["id"], a["version"]) for a in listed] == [("intent-v1", 1)]
    assert phrase_of(serve_assets, answer(http, "acme", "intent-v1", prompt), prompt) == "alpha"
    assert http.get("/health").status_code == 200
    record_scenario("bad input", f"hostile adapter submissions ({len(cases)} kinds, each as POST and as PUT over a live adapter)",
                    bad_inputs=", ".join(cases), lost="nothing",
                    outcome="every one refused with its 4xx and a message naming `source`; the live adapter kept its version and answers; /health 200",
                    submissions=2 * len(cases))


# --------------------------------------------------------------------------- quotas


def test_quotas_give_409_and_429_with_retry_after(http, serve_assets):
    prompt = serve_assets.prompts[0]
    # max adapters (globex: 2, it has intent-v1)
    assert http.post("/v1/adapters", headers=auth("globex"), json={"name": "second", "source": str(serve_assets.adapters["gamma"])}).status_code == 201
    error(http.post("/v1/adapters", headers=auth("globex"), json={"name": "third", "source": str(serve_assets.adapters["gamma"])}),
          409, "adapter_quota_exceeded")
    assert http.delete("/v1/adapters/second", headers=auth("globex")).status_code == 200
    # requests per minute
    r = http.post("/admin/tenants", headers=ADMIN, json={"name": "initech", "quotas": {"requests_per_minute": 2}})
    key = {"Authorization": f"Bearer {r.json()['api_key']['key']}"}
    statuses = [complete(http, key, BASE, prompt) for _ in range(3)]
    assert [s.status_code for s in statuses] == [200, 200, 429], [s.text for s in statuses]
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded" and int(statuses[2].headers["retry-after"]) >= 1
    # tokens per minute: one request spends the budget, the next waits
    assert http.patch("/admin/tenants/initech", headers=ADMIN, json={"quotas": {"requests_per_minute": None, "tokens_per_minute": 20}}).status_code == 200
    first = complete(http, key, BASE, prompt)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 20
    over = complete(http, key, BASE, prompt)
    assert error(over, 429, "rate_limit_exceeded") and int(over.headers["retry-after"]) >= 1
    # concurrency: one in flight at a time
    assert http.patch("/admin/tenants/initech", headers=ADMIN, json={"quotas": {"tokens_per_minute": None, "max_concurrent_requests": 1}}).status_code == 200

    async def two_at_once():
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=120) as client:
            body = {"model": BASE, "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}
            async with client.stream("POST", "/v1/completions", headers=key, json=body) as streaming:
                assert streaming.status_code == 200
                second = await client.post("/v1/completions", headers=key, json={**body, "stream": False})
                async for _ in streaming.aiter_bytes():
                    pass
            third = await client.post("/v1/completions", headers=key, json={**body, "stream": False})
            return second, third

    second, third = asyncio.run(two_at_once())
    assert error(second, 429, "concurrency_limit_exceeded") and second.headers["retry-after"] == "1"
    assert third.status_code == 200, third.text


# --------------------------------------------------------------------------- pinning, revocation, restart


def test_pinning_holds_a_slot_and_is_bounded_by_max_loras(http, serve_assets):
    r = http.patch("/v1/adapters/intent-v1", headers=auth("acme"), json={"pin": True})
    assert r.status_code == 200 and r.json()["pinned"] is True, r.text
    card = http.get("/v1/adapters", headers=auth("acme")).json()["data"][0]
    lora_ids = wait_for(lambda: [s for s in engine_states(http).values() if s.get("pinned")], what="both engines to pin it")
    pinned_id = lora_ids[0]["pinned"][0]
    wait_for(lambda: all(pinned_id in s.get("pinned", []) and pinned_id in s.get("cpu", []) for s in engine_states(http).values()),
             what="every replica to pin it in its engine")
    assert card["pinned"]
    # max_loras is 2: one pin at most (one slot stays free for everything else)
    err = error(http.patch("/v1/adapters/intent-v1", headers=auth("globex"), json={"pin": True}), 409, "pin_limit_reached")
    assert "at most 1" in err["message"]
    # the other adapters, the base and the shared ones keep working around the pinned slot, and the pin stays
    prompt = serve_assets.prompts[0]
    assert phrase_of(serve_assets, answer(http, "globex", "intent-v1", prompt), prompt) == "beta"
    assert complete(http, {}, "gamma", prompt).status_code == 200 and complete(http, {}, BASE, prompt).status_code == 200
    assert all(pinned_id in s.get("pinned", []) and pinned_id in s.get("cpu", []) for s in engine_states(http).values())


def test_revoked_keys_stop_working(http):
    r = http.post("/admin/tenants/globex/keys", headers=ADMIN, json={"label": "ci"})
    assert r.status_code == 201
    spare = {"Authorization": f"Bearer {r.json()['key']}"}
    assert http.get("/v1/adapters", headers=spare).status_code == 200
    assert http.delete(f"/admin/tenants/globex/keys/{r.json()['id']}", headers=ADMIN).status_code == 200
    error(http.get("/v1/adapters", headers=spare), 401, "invalid_api_key")
    assert http.get("/v1/adapters", headers=auth("globex")).status_code == 200  # the tenant's other key still works
    record_scenario("security", "revoked key", bad_inputs="a key used right after DELETE /admin/tenants/<t>/keys/<id>", lost="nothing",
                    outcome="401 on the next request (same replica; other replicas within tenancy.poll_interval_s); the tenant's other key works")


def test_different_names_register_in_parallel(served, serve_assets):
    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            posts = [client.post("/v1/adapters", headers=auth("acme"), json={"name": f"par-{i}", "source": str(serve_assets.adapters[a])})
                     for i, a in enumerate(["alpha", "gamma"])]
            created = await asyncio.gather(*posts)
            deleted = await asyncio.gather(*[client.delete(f"/v1/adapters/par-{i}", headers=auth("acme")) for i in range(2)])
            return created, deleted

    created, deleted = asyncio.run(run())
    assert [r.status_code for r in created] == [201, 201], [r.text for r in created]
    assert len({r.json()["lora_id"] for r in created}) == 2 and [r.status_code for r in deleted] == [200, 200]


def test_a_change_made_elsewhere_reaches_the_server_within_the_poll_interval(http, served):
    """`lorafleet tenants` writes the registry directly (like another replica would): the running
    server applies it within tenancy.poll_interval_s (0.5 s here)."""
    from lorafleet.cli import main as lorafleet

    url = served.cfg.registry_url()
    r = http.post("/admin/tenants/acme/keys", headers=ADMIN, json={"label": "to-revoke"})
    doomed = {"Authorization": f"Bearer {r.json()['key']}"}
    assert http.get("/v1/adapters", headers=doomed).status_code == 200  # known to the server now
    assert lorafleet(["tenants", "revoke-key", r.json()["id"], "--registry-url", url]) == 0
    revoked_at = time.monotonic()
    wait_for(lambda: http.get("/v1/adapters", headers=doomed).status_code == 401, timeout=5, what="the revocation to propagate")
    print(f"\nrevocation seen by the server after {time.monotonic() - revoked_at:.2f}s (poll interval 0.5 s)")


def test_adapters_cli_talks_to_the_server(served, serve_assets, capsys):
    from lorafleet.cli import main as lorafleet

    common = ["--server", served.url, "--api-key", KEYS["globex"]]
    assert lorafleet(["adapters", "register", "cli-made", "--source", str(serve_assets.adapters["gamma"]), *common]) == 0
    assert lorafleet(["adapters", "replace", "cli-made", "--source", str(serve_assets.adapters["alpha"]), *common]) == 0
    assert lorafleet(["adapters", "status", *common]) == 0
    table = capsys.readouterr().out
    assert "cli-made" in table and "intent-v1" in table
    assert lorafleet(["adapters", "status", "cli-made", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert lorafleet(["adapters", "delete", "cli-made", *common]) == 0
    assert lorafleet(["adapters", "delete", "cli-made", *common]) == 1
    assert "adapter_not_found" in capsys.readouterr().err


def test_a_restarted_server_serves_the_same_adapters_without_re_registration(http, served, serve_assets):
    prompt = serve_assets.prompts[0]
    before = set(engine_states(http))
    seconds = served.restart()
    print(f"\napp redeployed in {seconds:.1f}s")
    assert phrase_of(serve_assets, answer(http, "acme", "intent-v1", prompt), prompt) == "alpha"
    assert phrase_of(serve_assets, answer(http, "globex", "intent-v1", prompt), prompt) == "beta"
    card = http.get("/v1/adapters/intent-v1", headers=auth("acme")).json()
    assert card["pinned"] is True and card["version"] == 1
    # the new engine replicas re-apply the pin from the registry
    wait_for(lambda: len(new := {r: s for r, s in engine_states(http).items() if r not in before}) == 2
             and all(card["lora_id"] in s.get("pinned", []) for s in new.values()), what="the restarted engines to re-pin")
    # deleting a tenant takes its keys and adapters with it
    assert http.delete("/admin/tenants/initech", headers=ADMIN).status_code == 200
    assert http.patch("/v1/adapters/intent-v1", headers=auth("acme"), json={"pin": False}).json()["pinned"] is False
