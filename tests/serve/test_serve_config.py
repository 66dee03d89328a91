"""Fast checks of the serving pieces that need no running engine: the config model and the
repo's Serve YAML files, engine arguments on CPU and GPU, request validation, adapter
sources and path rules, and the CLI's refusal of a bad config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lorafleet.config.base import ConfigError
from lorafleet.serve.adapters import AdapterCatalog, AdapterError, content_hash
from lorafleet.serve.config import APP_IMPORT_PATH, ServeConfig, load_serve_config
from starlette.requests import Request

from lorafleet.serve.errors import OpenAIError
from serve_helpers import build_untrained_base

REPO = Path(__file__).resolve().parents[2]
SERVE_YAMLS = sorted((REPO / "serve").glob("*.yaml"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An untrained 2-layer Llama (hidden 128): what adapters are validated against."""
    return build_untrained_base(tmp_path_factory.mktemp("untrained") / "tiny-base")


def make_adapter(folder: Path, r: int = 8, seed: int = 0, **extra) -> Path:
    """A small PEFT-layout LoRA folder for the ``base`` fixture (real safetensors, random A and B)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16, "base_model_name_or_path": "tiny-base",
                                                            "target_modules": ["q_proj"], **extra}))
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(r, 128, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(128, r, generator=g)},
              str(folder / "adapter_model.safetensors"))
    return folder


def cfg_with(tmp_path: Path, base: Path, adapters: list[dict], **kw) -> ServeConfig:
    return ServeConfig(model=str(base), adapters=adapters, allowed_local_roots=[str(tmp_path / "allowed")],
                       adapter_cache_dir=str(tmp_path / "cache"), engine={"max_lora_rank": 16}, **kw)


# --------------------------------------------------------------------------- config files


def test_there_are_serve_yamls():
    assert {p.name for p in SERVE_YAMLS} >= {"tiny-cpu.yaml", "llama-8b-gpu.yaml"}


@pytest.mark.parametrize("path", SERVE_YAMLS, ids=lambda p: p.name)
def test_every_serve_yaml_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and path.name in first and ("serve run" in first or "serve deploy" in first), first
    cfg = load_serve_config(path)
    data = yaml.safe_load(path.read_text())
    (app,) = [a for a in data["applications"] if a["import_path"] == APP_IMPORT_PATH]
    # `lorafleet serve` binds host/port from the args, `serve run` from http_options: they must agree
    assert (cfg.host, cfg.port) == (data["http_options"]["host"], data["http_options"]["port"])
    assert app["route_prefix"] == cfg.route_prefix
    if "gpu" in path.name:
        assert cfg.deployment.num_gpus >= 1 and cfg.engine.dtype == "bfloat16"
        assert cfg.engine.max_cpu_loras >= 100 and cfg.engine.max_loras >= 8


def test_unknown_keys_and_cross_field_rules_are_listed_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "m", "engin": {}, "engine": {"max_loras": 8, "max_cpu_loras": 4, "max_lora_rank": 12}}))
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    assert any("engin: unknown key" in err for err in e.value.errors)
    bad.write_text(yaml.safe_dump({"model": "m", "engine": {"max_loras": 8, "max_cpu_loras": 4, "max_lora_rank": 12, "max_model_len": 512},
                                   "deployment": {"num_replicas": 2, "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
                                   "adapters": [{"name": "a", "source": "/x"}, {"name": "a", "source": "models:/a/1"}]}))
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    text = str(e.value)
    for expected in ("max_cpu_loras (4) must be >= engine.max_loras (8)", "max_lora_rank (12) must be one of",
                     "num_replicas (2) and deployment.autoscaling are exclusive", "min_replicas (3) must be <= max_replicas (2)",
                     "names must be unique, repeated: ['a']"):
        assert expected in text, (expected, text)
    # rules across sections once every section is valid on its own
    bad.write_text(yaml.safe_dump({"model": "m", "adapters": [{"name": "m", "source": "/x"}]}))
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    assert "allowed_local_roots is empty" in str(e.value) and "'m' is the base model's name" in str(e.value)
    with pytest.raises(ConfigError, match="models:/<name>/<version>"):
        load_serve_config(bad, ["adapters=[{name: b, source: 'models:/only-a-name'}]"])


def test_overrides_and_bare_config_files(tmp_path):
    cfg = load_serve_config(REPO / "serve" / "tiny-cpu.yaml", ["port=8123", "engine.max_loras=2", "deployment.num_replicas=3"])
    assert (cfg.port, cfg.engine.max_loras, cfg.deployment.num_replicas) == (8123, 2, 3)
    bare = tmp_path / "bare.yaml"
    bare.write_text("# lorafleet serve --config bare.yaml\nmodel: some/base\nserved_model_name: b\n")
    cfg = load_serve_config(bare, ["host=0.0.0.0"])
    assert cfg.base_model_name == "b" and cfg.host == "0.0.0.0" and cfg.adapters == []
    assert ServeConfig(model="org/Model-7B").base_model_name == "Model-7B"
    # relative local paths (and a relative sqlite store) become absolute for replicas elsewhere
    rel = ServeConfig(model="m", adapters=[{"name": "a", "source": "out/a"}], allowed_local_roots=["out"],
                      mlflow_tracking_uri="sqlite:///work/mlflow.db").absolute(tmp_path)
    assert rel.adapters[0].source == str(tmp_path / "out/a") and rel.allowed_local_roots == [str(tmp_path / "out")]
    assert rel.mlflow_tracking_uri == f"sqlite:///{tmp_path}/work/mlflow.db" and rel.model == "m"


def test_builder_options_follow_the_config():
    from lorafleet.serve.app import MANAGEMENT_HEADROOM, deployment_options

    cfg = ServeConfig(model="m", deployment={"num_replicas": None, "autoscaling": {"min_replicas": 1, "max_replicas": 4},
                                             "num_gpus": 1, "max_ongoing_requests": 64, "env_vars": {"HF_HOME": "/cache"}},
                      limits={"max_queued_requests": 100})
    options = deployment_options(cfg)
    assert options["name"] == "LoRAServer"
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"HF_HOME": "/cache"}}
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["max_queued_requests"] >= 4 * (64 + 100) * 4
    # Serve hands a replica more than its own admission bound (64 + 100), so that the replica's
    # OpenAI-shaped 503 answers an overload, not Serve's plain-text back-pressure
    assert options["max_ongoing_requests"] == 64 + 100 + MANAGEMENT_HEADROOM


def test_engine_arguments_differ_only_by_device():
    from lorafleet.serve.engine import engine_setup, frontend_args

    cfg = ServeConfig(model="m", adapters=[{"name": "a", "source": "models:/a/1"}],
                      engine={"max_loras": 2, "max_cpu_loras": 6, "max_lora_rank": 32, "max_model_len": 300}, limits={"max_tokens": 77})
    cpu, gpu = engine_setup(cfg, device="cpu"), engine_setup(cfg, device="cuda")
    # on CPU only, vLLM's worker loads the extension that masks no-LoRA rows in its CPU LoRA ops (vllm_cpu_lora.py)
    assert (cpu.args.dtype, cpu.args.enforce_eager, cpu.args.worker_extension_cls) == ("float32", True, "lorafleet.serve.vllm_cpu_lora.CPULoRAPatch")
    assert (gpu.args.dtype, gpu.args.enforce_eager, gpu.args.worker_extension_cls) == ("bfloat16", False, "")
    for setup in (cpu, gpu):
        a = setup.args
        assert a.enable_lora and (a.max_loras, a.max_cpu_loras, a.max_lora_rank, a.max_model_len) == (2, 6, 32, 300)
        assert a.served_model_name == ["m"] and a.override_generation_config == {"max_new_tokens": 77}
        # vLLM's own frontend defaults, with the engine arguments: what init_app_state reads
        front = frontend_args(cfg, setup)
        assert front.max_loras == 2 and front.tool_call_parser is None and not front.enable_auto_tool_choice
        assert front.response_role == "assistant" and front.served_model_name == ["m"]
    tools = ServeConfig(model="m", engine={"tool_call_parser": "hermes", "json_whitespace": False})
    setup = engine_setup(tools, device="cpu")
    front = frontend_args(tools, setup)
    assert front.tool_call_parser == "hermes" and front.enable_auto_tool_choice
    assert setup.args.structured_outputs_config.disable_any_whitespace


# --------------------------------------------------------------------------- lorafleet's limits on top of vLLM's request models


def _completion(**fields):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest(**{"model": "a", "prompt": "x", **fields})


def _chat(**fields):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(**{"model": "a", "messages": [{"role": "user", "content": "x"}], **fields})


@pytest.mark.parametrize("kind, make, fields, param, code", [
    ("completions", _completion, {"max_tokens": 65}, "max_tokens", "max_tokens_too_large"),
    ("chat", _chat, {"max_completion_tokens": 65}, "max_completion_tokens", "max_tokens_too_large"),
    ("chat", _chat, {"max_tokens": 1000}, "max_tokens", "max_tokens_too_large"),
    ("completions", _completion, {"n": 5, "temperature": 1.0}, "n", None),
    ("completions", _completion, {"prompt": ["a", "b", "c", "d", "e"]}, "prompt", None),
    ("completions", _completion, {"prompt": [[1], [2], [3], [4], [5]]}, "prompt", None),
])
def test_the_servers_own_caps_are_400_naming_the_parameter(kind, make, fields, param, code):
    from lorafleet.serve.config import LimitSettings
    from lorafleet.serve.limits import apply_limits

    with pytest.raises(OpenAIError) as e:
        apply_limits(kind, make(**fields), LimitSettings(max_tokens=64, max_n=4))
    assert e.value.status == 400 and e.value.param == param and e.value.body()["error"]["type"] == "invalid_request_error"
    if code:
        assert e.value.code == code


def test_requests_within_the_caps_pass_and_token_id_prompts_count_as_one():
    from lorafleet.serve.config import LimitSettings
    from lorafleet.serve.limits import apply_limits

    limits = LimitSettings(max_tokens=64, max_n=4)
    for kind, request in [("completions", _completion(max_tokens=64, n=4, temperature=1.0)), ("completions", _completion(prompt=[1, 2, 3] * 10)),
                          ("chat", _chat(max_completion_tokens=64)), ("chat", _chat())]:
        apply_limits(kind, request, limits)


def test_bodies_above_the_limit_get_413_before_anything_parses_them():
    """BodyLimit (the server's ASGI middleware) on a plain FastAPI app: declared and streamed (chunked) bodies."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from lorafleet.serve.limits import BodyLimit

    app = FastAPI()
    app.add_middleware(BodyLimit)
    app.state.max_body_bytes = 1000

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    async def chunks(n: int):
        for _ in range(n):
            yield b"a" * 300

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.post("/echo", content=b"a" * 1000), await client.post("/echo", content=b"a" * 1001),
                    await client.post("/echo", content=chunks(3)), await client.post("/echo", content=chunks(4))]

    exact, over, streamed, streamed_over = asyncio.run(run())
    assert exact.json() == {"bytes": 1000} and streamed.json() == {"bytes": 900}
    for r in (over, streamed_over):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_integers_no_engine_type_holds_are_refused_by_name():
    from lorafleet.serve.limits import integers_in_range

    for fields, where in [({"top_k": 2**64 + 1}, "top_k"), ({"top_k": -(2**70)}, "top_k"), ({"stop_token_ids": [5, 2**63]}, "stop_token_ids.1"),
                          ({"logit_bias": {"99999999999999999999": 1.0}}, "logit_bias.99999999999999999999")]:
        with pytest.raises(OpenAIError) as e:
            integers_in_range(_completion(**fields))
        assert e.value.status == 400 and e.value.param == where, (fields, e.value.body())
    integers_in_range(_completion(top_k=2**40, seed=2**63 - 1, stop_token_ids=[1, 2]))


def test_fields_that_reach_past_the_tenant_are_refused_by_name():
    from lorafleet.serve.limits import refused_fields

    for name in ("kv_transfer_params", "ec_transfer_params"):
        with pytest.raises(OpenAIError) as e:
            refused_fields(_completion(**{name: {"remote_host": "10.0.0.1"}}))
        assert e.value.status == 400 and e.value.param == name and e.value.code == "unsupported_parameter"
    refused_fields(_chat(top_k=5, repetition_penalty=1.2, ignore_eos=True))  # vLLM's own sampling fields pass


# --------------------------------------------------------------------------- adapter sources


def test_local_sources_must_stay_inside_the_allowed_roots(tmp_path, base):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    make_adapter(allowed / "good")
    make_adapter(outside / "secret")
    (allowed / "escape").symlink_to(outside / "secret")          # a link inside pointing out
    (allowed / "via-dotdot").mkdir()
    make_adapter(allowed / "big", r=32)
    make_adapter(allowed / "with-head", modules_to_save=["lm_head"])
    (allowed / "empty").mkdir()
    sources = {"good": allowed / "good", "escape": allowed / "escape", "dotdot": allowed / "via-dotdot" / ".." / ".." / "outside" / "secret",
               "outside": outside / "secret", "big": allowed / "big", "head": allowed / "with-head", "empty": allowed / "empty",
               "missing": allowed / "nope"}
    catalog = AdapterCatalog(cfg_with(tmp_path, base, [{"name": n, "source": str(p)} for n, p in sources.items()]))
    good = catalog.resolve("good")
    assert good.lora_id == 1 and good.content_hash == content_hash(allowed / "good")
    assert Path(good.path).parent == tmp_path / "cache"  # served from a frozen, content-addressed copy
    assert good.lora_request().lora_int_id == 1 and good.lora_request().lora_path == good.path
    for name, status, message in [("escape", 403, "outside the server's allowed local roots"), ("dotdot", 403, "outside the server's allowed"),
                                  ("outside", 403, "outside the server's allowed"), ("big", 422, r"'big' .*rank \(r=32\) is above this server's limit of 16"),
                                  ("head", 422, "modules_to_save"), ("empty", 422, "has no adapter_model.safetensors"), ("missing", 404, "does not exist")]:
        with pytest.raises(AdapterError, match=message) as caught:
            catalog.resolve(name)
        assert caught.value.status == status, (name, caught.value)
    assert [catalog.lora_id(n) for n in catalog.names] == list(range(1, len(sources) + 1))


def test_registry_sources_download_once_into_the_content_cache(tmp_path, base):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
    make_adapter(tmp_path / "src")
    client.log_artifacts(run.info.run_id, str(tmp_path / "src"), artifact_path="adapter")
    client.create_registered_model("reg")
    client.create_model_version("reg", source=f"runs:/{run.info.run_id}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("reg", "champion", "1")
    cfg = ServeConfig(model=str(base), mlflow_tracking_uri=uri, adapter_cache_dir=str(tmp_path / "cache"), engine={"max_lora_rank": 8},
                      adapters=[{"name": "v1", "source": "models:/reg/1"}, {"name": "champ", "source": "models:/reg@champion"},
                                {"name": "gone", "source": "models:/reg/7"}])
    v1, champ = AdapterCatalog(cfg).resolve("v1"), AdapterCatalog(cfg).resolve("champ")
    assert v1.content_hash == champ.content_hash == content_hash(tmp_path / "src") and v1.path == champ.path
    # a numbered version is remembered: a new catalogue (a restarted replica) does not download again
    (tmp_path / "art").rename(tmp_path / "art-moved")
    assert AdapterCatalog(cfg).resolve("v1").path == v1.path
    with pytest.raises(AdapterError, match="could not download models:/reg/7"):
        AdapterCatalog(cfg).resolve("gone")


def test_cli_refuses_a_bad_config(tmp_path, capsys):
    from lorafleet.serve.cli import serve_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nengine: {max_loras: 0}\nprot: 1\n")
    assert serve_main(str(bad), ["port=70000"]) == 2
    err = capsys.readouterr().err
    assert "prot: unknown key" in err and "engine.max_loras" in err and "port" in err


def test_ingress_mode_is_the_environment_of_the_ray_that_lorafleet_serve_starts(monkeypatch, caplog):
    """deployment.ingress is a Ray cluster setting: `lorafleet serve` sets it before it imports Ray Serve
    and starts Ray (whose processes inherit it); it cannot change a cluster it joins, or a Serve already imported."""
    import sys

    from lorafleet.serve.cli import ingress_env

    for k in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY"):
        monkeypatch.delenv(k, raising=False)
    proxy = ServeConfig(model="m")
    haproxy = ServeConfig(model="m", deployment={"ingress": "haproxy"})
    with pytest.raises(ValueError, match="ingress"):
        ServeConfig(model="m", deployment={"ingress": "direct-ish"})
    monkeypatch.delitem(sys.modules, "ray.serve", raising=False)
    assert ingress_env(proxy) == {}
    assert ingress_env(haproxy) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    assert ingress_env(haproxy) == {}
    assert ingress_env(proxy) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with caplog.at_level("WARNING"):
        assert ingress_env(proxy) == {}
    assert "Ray Serve needs RAY_SERVE_ENABLE_DIRECT_INGRESS=0 RAY_SERVE_ENABLE_HA_PROXY=0" in caplog.text
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setitem(sys.modules, "ray.serve", object())
    with pytest.raises(ConfigError, match="before Ray Serve is imported"):
        ingress_env(proxy)
