"""The one configuration model of the server (``ServeConfig``) and its loader.

The same model is read three ways:

* ``serve run serve/tiny-cpu.yaml`` / ``serve deploy``: a Ray Serve config file whose
  application ``args`` are a ``ServeConfig`` (``import_path: lorafleet.serve.app:build_app``);
* ``lorafleet serve --config FILE [--set key.path=value ...]``: FILE is either such a Serve
  config file (the first lorafleet application is taken) or a bare ``ServeConfig`` YAML;
* ``ServeConfig(...)`` in Python (tests, notebooks).

Field names follow vLLM (``max_loras``, ``max_cpu_loras``, ``max_lora_rank``,
``max_model_len``, ``max_num_seqs``...) and Ray Serve (``num_replicas``,
``max_ongoing_requests``, ``max_queued_requests``...). Cross-field rules are checked in one
validator that reports every violated rule with both values.

Example::

    cfg = load_serve_config("serve/tiny-cpu.yaml", ["port=8001", "engine.max_loras=4"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from lorafleet.config.base import ConfigError, StrictModel, apply_overrides, read_yaml, validate_config
from lorafleet.ftapi.config import FileSettings, FineTuningSettings

# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
APP_IMPORT_PATH = "lorafleet.serve.app:build_app"
# deployment.ingress -> the Ray Serve settings it stands for. Serve reads them when ray.serve is
# first imported, in every process of the cluster (controller, proxies, replicas).
INGRESS_ENV = {
    "proxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "haproxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def ingress_mismatch(ingress: str, environ) -> tuple[dict[str, str], str]:
    """The variables ``environ`` lacks for ``ingress`` (empty: it matches), and a message naming them."""
    wanted = INGRESS_ENV[ingress]
    differs = {k: v for k, v in wanted.items() if environ.get(k, "0") != v}
    return differs, (f"deployment.ingress is {ingress} but this environment has {({k: environ.get(k, 'unset') for k in wanted})}; "
                     f"Ray Serve needs {' '.join(f'{k}={v}' for k, v in wanted.items())}")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # the registry's tenant names
_TENANT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._-"  # every character TENANT_NAME admits
_MODELS_URI = re.compile(r"^models:/[^/@]+(/[^/]+|@[^/]+)/?$")


def adapter_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot name an adapter (None when it can): the one rule for config and runtime adapters."""
    if not _ADAPTER_NAME.match(name):
        return "adapter name must start with a letter or digit and contain only letters, digits and `._:-` (at most 128 characters)"
    return None


def source_problem(source: str) -> Optional[str]:
    """Why ``source`` is not an adapter source (None when it is): ``models:/...`` or a local folder."""
    if any(ord(c) < 32 or c == "\x7f" for c in source):
        return "it contains control characters (NUL, newline...), which no path or registry URI may hold"
    if source.startswith("models:") and not _MODELS_URI.match(source):
        return "an MLflow source must look like models:/<name>/<version> or models:/<name>@<alias>"
    if "://" in source and not source.startswith("models:"):
        return "sources are MLflow registry URIs (models:/...) or local folders; other URI schemes are not supported"
    return None


class EngineSettings(StrictModel):
    """vLLM engine arguments (``vllm.engine.arg_utils.AsyncEngineArgs``) this server exposes.

    ``lorafleet.serve.engine.engine_args`` is the one place these become engine arguments
    and where CPU and GPU defaults differ.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight/activation dtype. `auto`: float32 on CPU (bfloat16 crashes vLLM's CPU kernels on many CPUs), bfloat16 on GPU.")
    max_model_len: Optional[int] = Field(
        None, ge=16, description="Context length in tokens (prompt + completion). Default: the model's own maximum.")
    max_loras: int = Field(
        4, ge=1, description="Adapters that can be active in one batch (vLLM GPU slots). Requests for more adapters wait for a slot.")
    max_cpu_loras: Optional[int] = Field(
        None, ge=1, description="Adapters kept loaded in host memory (vLLM's LRU cache behind the slots); evicted least-recently-used. Default: max_loras.")
    max_lora_rank: int = Field(
        16, description=f"Largest LoRA rank `r` any adapter may have; one of {list(VLLM_LORA_RANKS)}. Memory per slot grows with it.")
    max_num_seqs: int = Field(
        32, ge=1, description="Sequences vLLM batches together per step (all adapters mixed).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of accelerator memory vLLM may use (weights + KV cache). On CPU it is the fraction of host memory; keep it low (0.1-0.2) on shared machines.")
    kv_cache_memory_bytes: Optional[int] = Field(
        None, ge=1, description="Explicit KV-cache size in bytes; overrides gpu_memory_utilization for the cache (predictable on CPU).")
    enforce_eager: Optional[bool] = Field(
        None, description="Disable CUDA graphs / torch.compile. Default: true on CPU, false on GPU.")
    seed: int = Field(0, description="Engine seed (requests may pass their own `seed`).")
    max_logprobs: int = Field(20, ge=0, le=20, description="Largest `logprobs` / `top_logprobs` a request may ask for.")
    log_engine_stats: bool = Field(False, description="Let vLLM log its periodic throughput lines.")
    tool_call_parser: Optional[str] = Field(
        None, description="vLLM tool-call parser for the base's tool-call format (`hermes`, `llama3_json`, `mistral`, ...): turns on tool "
                          "calling (vLLM's --enable-auto-tool-choice --tool-call-parser). Without it, `tools` with a `tool_choice` "
                          "other than none get vLLM's 400.")
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template (file path or the template itself) used instead of the tokenizer's (vLLM's --chat-template).")
    json_whitespace: bool = Field(
        True, description="Structured outputs (`response_format`, forced tool calls) may emit any JSON whitespace. false forbids it "
                          "(vLLM's structured_outputs_config.disable_any_whitespace): small models otherwise tend to fill their budget with spaces.")

    # Rules within one section are checked by the section, so that they are listed together with
    # the problems of every other section; rules across sections are ServeConfig's.
    @model_validator(mode="after")
    def _engine_rules(self) -> "EngineSettings":
        problems = []
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"engine.max_lora_rank ({self.max_lora_rank}) must be one of {list(VLLM_LORA_RANKS)} (vLLM's supported ranks)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            problems.append(f"engine.max_cpu_loras ({self.max_cpu_loras}) must be >= engine.max_loras ({self.max_loras})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of the engine deployment (``autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0, description="Fewest engine replicas (0 scales to zero; the first request then waits for a cold start).")
    max_replicas: int = Field(2, ge=1, description="Most engine replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="Ongoing requests per replica Serve aims for when scaling.")


class DeploymentSettings(StrictModel):
    """How many engine replicas run and what each holds (Ray Serve deployment options)."""

    num_replicas: Optional[int] = Field(1, ge=1, description="Fixed number of engine replicas, each with its own vLLM engine and every adapter. Set to null when `autoscaling` is given.")
    autoscaling: Optional[AutoscalingSettings] = Field(None, description="Scale engine replicas with load instead of a fixed num_replicas.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica runs at once (vLLM batches them); up to limits.max_queued_requests more wait in its queue. Keep it >= engine.max_num_seqs.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per engine replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per engine replica (1 on a GPU cluster; vLLM uses the one Ray assigns).")
    max_replicas_per_node: Optional[int] = Field(None, ge=1, description="Most engine replicas Serve places on one Ray node (Serve's `max_replicas_per_node`): 1 spreads them one per node, so losing a node loses one replica; null: no limit.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the engine replicas (Ray runtime_env), e.g. VLLM_CPU_OMP_THREADS_BIND, HF_HOME, HF_TOKEN.")
    health_check_period_s: float = Field(10, gt=0, description="How often Serve checks that each replica's engine is alive.")
    health_check_timeout_s: float = Field(60, gt=0, description="How long one health check may take before the replica is restarted.")
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="How a client's HTTP connection reaches a replica. `proxy`: Ray Serve's HTTP proxy forwards each request to a "
        "replica (one Ray hop). `haproxy`: Ray Serve 2.60's direct ingress behind HAProxy (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, "
        "RAY_SERVE_ENABLE_HA_PROXY=1): every replica serves HTTP itself and HAProxy balances connections over them, no Ray hop. "
        "A setting of the Ray cluster: `lorafleet serve` sets it for the Ray it starts; for `serve run` / `serve deploy` to a "
        "`ray start` cluster, start every node with those variables (docs/serving.md, \"Ingress\").")

    @model_validator(mode="after")
    def _deployment_rules(self) -> "DeploymentSettings":
        problems, a = [], self.autoscaling
        if a is not None and self.num_replicas is not None:
            problems.append(f"deployment.num_replicas ({self.num_replicas}) and deployment.autoscaling are exclusive; set num_replicas: null to autoscale")
        if a is None and self.num_replicas is None:
            problems.append("deployment.num_replicas is null but deployment.autoscaling is not set; give one of them")
        if a is not None and a.min_replicas > a.max_replicas:
            problems.append(f"deployment.autoscaling.min_replicas ({a.min_replicas}) must be <= max_replicas ({a.max_replicas})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AdapterSource(StrictModel):
    """One adapter the server offers: a client names it in the request's `model` field."""

    name: str = Field(description="Name clients put in `model` (letters, digits, `._:-`; at most 128 characters).")
    source: str = Field(description="`models:/<registered name>/<version>`, `models:/<name>@<alias>` (MLflow registry) or a local PEFT adapter folder inside `allowed_local_roots`.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = adapter_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        problem = source_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def is_registry(self) -> bool:
        return self.source.startswith("models:")


class LimitSettings(StrictModel):
    """Per-request limits and the queue bound; requests over them get an OpenAI-style error."""

    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above it).")
    max_tokens: int = Field(1024, ge=1, description="Cap on `max_tokens` / `max_completion_tokens` of one request (400 above it); also the default for chat requests that give none (bounded by the context).")
    max_n: int = Field(8, ge=1, description="Cap on `n` (choices per prompt) and on the number of prompts in one completions request.")
    max_queued_requests: int = Field(128, ge=1, description="Requests one replica holds waiting beyond its deployment.max_ongoing_requests (in vLLM's queue) before new ones get 503 + Retry-After; also the bound of Serve's own queue.")


class QuotaSettings(StrictModel):
    """Default quotas of every tenant (a tenant's own values in the registry override them; null: unlimited)."""

    max_adapters: Optional[int] = Field(20, ge=0, description="Adapters one tenant may have registered at once (409 beyond).")
    requests_per_minute: Optional[int] = Field(None, ge=1, description="Requests per minute per tenant (429 with Retry-After beyond).")
    tokens_per_minute: Optional[int] = Field(None, ge=1, description="Prompt + completion tokens per minute per tenant, counted when a request ends; new requests get 429 with Retry-After while the minute's budget is spent.")
    max_concurrent_requests: Optional[int] = Field(None, ge=1, description="Requests of one tenant in flight at once (429 beyond).")


class TenancySettings(StrictModel):
    """Tenants, API keys, runtime adapters and their quotas (see lorafleet.serve.registry)."""

    registry_url: Optional[str] = Field(None, description="SQLAlchemy URL of the tenant/key/adapter registry shared by every replica. Default: sqlite:///<state_dir>/registry.db (one node); use postgresql://... on a cluster.")
    state_dir: Optional[str] = Field(None, description="Server state (the default SQLite registry). Default: <work dir>/serve/state.")
    admin_key: Optional[SecretStr] = Field(None, description="Admin key for /admin/* (tenants and keys). Prefer the environment variable named by admin_key_env, or admin_key_sha256; never logged.")
    admin_key_env: str = Field("LORAFLEET_ADMIN_KEY", description="Environment variable read (when the app is built) for the admin key if admin_key is not set.")
    admin_key_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the admin key, so that the key itself appears in no file.")
    allow_anonymous: bool = Field(False, description="Requests without an API key may call and list the base model and the config's adapters (local development).")
    allow_base: bool = Field(True, description="Whether new tenants may call the base model itself (per tenant in the registry).")
    share_config_adapters: bool = Field(True, description="Tenants may call the adapters listed in `adapters` (read-only) besides their own.")
    quotas: QuotaSettings = Field(default_factory=QuotaSettings, description="Default per-tenant quotas.")
    max_pinned: Optional[int] = Field(None, ge=0, description="Adapters that may be pinned in GPU slots, over all tenants. Default and maximum: engine.max_loras - 1 (one slot always stays free for the rest).")
    poll_interval_s: float = Field(1.0, gt=0, le=60, description="How often every replica checks the registry for changes: a change made through one replica reaches all others within this time (plus one query).")
    max_adapter_bytes: int = Field(2 * 2**30, ge=1024, description="Largest adapter folder accepted at registration (413 above).")
    base_aliases: list[str] = Field(default_factory=list, description="Other names the base model is known by: an adapter whose adapter_config.json names one of them as its base is accepted.")
    tenant_models: list[str] = Field(default_factory=list, description="Registered MLflow models a tenant may serve through `models:/` sources: fnmatch patterns of the model name in which `{tenant}` stands for the caller's tenant, e.g. `{tenant}~*` (acme: `acme~intent`). `{tenant}` must be followed by a character tenant names cannot hold (`~`) or end the pattern, and no wildcard may precede it, so no tenant's pattern matches another's names. Empty: any registered model, which lets one tenant serve an adapter another tenant trained; set this (and tenant_local_roots) when tenants do not trust each other.")
    tenant_local_roots: list[str] = Field(default_factory=list, description="Folders a tenant's local sources must lie inside (after resolving symlinks), with `{tenant}` as one whole path component, e.g. `/srv/adapters/{tenant}`; a source must also lie inside allowed_local_roots. Empty: anywhere in allowed_local_roots, for every tenant.")

    @field_validator("tenant_models")
    @classmethod
    def _per_tenant_models(cls, patterns: list[str]) -> list[str]:
        bad = []
        for p in patterns:
            before, _, after = p.partition("{tenant}")
            if "{tenant}" not in p or any(c in before for c in "*?[") or (after and (after[0] in _TENANT_CHARS or after[0] in "*?[")):
                bad.append(p)
        if bad:
            raise ValueError(f"each pattern must contain `{{tenant}}` with no wildcard before it and, after it, the end of the pattern or a "
                             f"character tenant names cannot hold (e.g. `{{tenant}}~*`); else one tenant's pattern also matches another "
                             f"tenant's models (`acme-*` matches acme-corp's): {bad}")
        return patterns

    @field_validator("tenant_local_roots")
    @classmethod
    def _per_tenant_roots(cls, roots: list[str]) -> list[str]:
        bad = [r for r in roots if not any(part == "{tenant}" for part in Path(r).parts)]
        if bad:
            raise ValueError(f"each folder must have `{{tenant}}` as one whole path component (e.g. /srv/adapters/{{tenant}}), "
                             f"so no tenant's folder holds another's: {bad}")
        return roots

    def scoped_models(self, tenant: str) -> list[str]:
        """``tenant_models`` for ``tenant`` (patterns of registered model names; empty: no rule)."""
        return [p.replace("{tenant}", tenant) for p in self.tenant_models]

    def scoped_roots(self, tenant: str) -> list[str]:
        """``tenant_local_roots`` for ``tenant`` (folders; empty: no rule)."""
        return [p.replace("{tenant}", tenant) for p in self.tenant_local_roots]

    def admin_digest(self) -> Optional[str]:
        """sha256 hex of the admin key from the config or the environment (None: admin API off)."""
        import hashlib
        import os

        if self.admin_key_sha256:
            return self.admin_key_sha256
        key = self.admin_key.get_secret_value() if self.admin_key else os.environ.get(self.admin_key_env)
        return hashlib.sha256(key.encode()).hexdigest() if key else None


class ServeConfig(StrictModel):
    """Everything the multi-LoRA server needs; validated once when the app is built."""

    model: str = Field(description="Base model: a hub name (e.g. meta-llama/Llama-3.1-8B-Instruct) or a local folder with config, tokenizer and weights.")
    served_model_name: Optional[str] = Field(None, description="Name clients use in `model` for the base itself. Default: the model's folder or hub name.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer folder or hub name when it differs from `model`.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine arguments.")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="Engine replicas, autoscaling and resources.")
    host: str = Field("127.0.0.1", description="HTTP address `lorafleet serve` binds (0.0.0.0 to expose it). With `serve run`/`serve deploy` the file's http_options apply; keep them equal.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port `lorafleet serve` binds (see `host`).")
    route_prefix: str = Field("/", description="URL prefix of the app (routes live under it, e.g. /v1/completions).")
    adapters: list[AdapterSource] = Field(default_factory=list, description="Adapters offered from the start; loaded into the engine lazily on first use.")
    allowed_local_roots: list[str] = Field(default_factory=list, description="Folders local adapter sources must lie inside (after resolving symlinks). A local source outside all of them is refused.")
    mlflow_tracking_uri: Optional[str] = Field(None, description="MLflow tracking/registry URI for models:/ sources. Default: $MLFLOW_TRACKING_URI, else the embedded store of the work dir.")
    adapter_cache_dir: Optional[str] = Field(None, description="Where registry adapters are downloaded (content-addressed, shared by replicas on a node). Default: <work dir>/serve/adapters.")
    download_adapters_at_start: bool = Field(True, description="Resolve (download and check) every adapter when a replica starts, so a bad source fails the deploy. false: on first use (many large adapters).")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request limits and the queue bound.")
    tenancy: TenancySettings = Field(default_factory=TenancySettings, description="Tenants, API keys, runtime adapters (hot-swap) and quotas.")
    files: FileSettings = Field(default_factory=FileSettings, description="Training files tenants upload (/v1/files), kept under <tenancy.state_dir>/files: limits and per-tenant quotas.")
    fine_tuning: FineTuningSettings = Field(default_factory=FineTuningSettings, description="Fine-tuning jobs (/v1/fine_tuning/jobs): the FinetuneConfig they start from.")

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list) -> list:
        names = [a.name for a in adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapters: names must be unique, repeated: {duplicates}")
        return adapters

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with `/`")
        return v

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "ServeConfig":
        e, d, problems = self.engine, self.deployment, []
        if d.max_ongoing_requests < e.max_num_seqs:
            problems.append(f"deployment.max_ongoing_requests ({d.max_ongoing_requests}) must be >= engine.max_num_seqs ({e.max_num_seqs}), or the engine never fills its batch")
        names = [a.name for a in self.adapters]
        if self.base_model_name in names:
            problems.append(f"adapters: {self.base_model_name!r} is the base model's name (served_model_name); give the adapter another name")
        local = [a.name for a in self.adapters if not a.is_registry]
        if local and not self.allowed_local_roots:
            problems.append(f"adapters {local} are local folders but allowed_local_roots is empty; list the folders adapters may be read from")
        if self.tenancy.tenant_local_roots and not self.allowed_local_roots:
            problems.append("tenancy.tenant_local_roots is set but allowed_local_roots is empty: a tenant's local source must lie inside both")
        if self.tenancy.max_pinned is not None and self.tenancy.max_pinned > e.max_loras - 1:
            problems.append(f"tenancy.max_pinned ({self.tenancy.max_pinned}) must be <= engine.max_loras - 1 ({e.max_loras - 1}): "
                            "pinned adapters hold GPU slots for good and one slot must stay free for the others")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def max_pinned(self) -> int:
        """How many adapters may be pinned (over all tenants)."""
        limit = self.engine.max_loras - 1
        return limit if self.tenancy.max_pinned is None else self.tenancy.max_pinned

    def state_path(self) -> Path:
        """The server's state dir (the default SQLite registry, uploaded files)."""
        from lorafleet.config.train import default_work_dir

        return (Path(self.tenancy.state_dir).expanduser() if self.tenancy.state_dir else default_work_dir() / "serve" / "state").resolve()

    def registry_url(self) -> str:
        """The registry's SQLAlchemy URL (default: SQLite in the state dir)."""
        from lorafleet.serve.registry import default_registry_url

        return self.tenancy.registry_url or default_registry_url(self.state_path())

    @property
    def base_model_name(self) -> str:
        """The name clients use for the base model."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.name if path.name else self.model

    def absolute(self, root: Optional[Path] = None) -> "ServeConfig":
        """A copy with local paths (model, tokenizer, local adapter sources, roots, cache dir)
        made absolute against ``root`` (default: the current directory), so replicas started
        in other working directories read the same files."""
        root = Path(root or Path.cwd())

        def fix(p: Optional[str]) -> Optional[str]:
            if p is None:
                return None
            q = Path(p).expanduser()
            if q.is_absolute():
                return str(q)
            candidate = root / q
            # A hub name (org/model) is not a local path: only rewrite what exists or clearly is one.
            return str(candidate) if candidate.exists() or p.startswith((".", "~")) else p

        data = self.model_dump()
        data["model"] = fix(self.model)
        data["tokenizer"] = fix(self.tokenizer)
        data["allowed_local_roots"] = [str((root / Path(r).expanduser())) for r in self.allowed_local_roots]
        data["tenancy"]["tenant_local_roots"] = [str((root / Path(r).expanduser())) for r in self.tenancy.tenant_local_roots]
        if self.adapter_cache_dir:
            data["adapter_cache_dir"] = str(root / Path(self.adapter_cache_dir).expanduser())
        data["mlflow_tracking_uri"] = _absolute_sqlite(self.mlflow_tracking_uri, root)
        # Pin the state dir and the registry URL now: replicas may run with another cwd or LORAFLEET_HOME.
        data["tenancy"]["state_dir"] = str(root / Path(self.tenancy.state_dir).expanduser() if self.tenancy.state_dir else self.state_path())
        data["tenancy"]["registry_url"] = _absolute_sqlite(self.tenancy.registry_url, root) or ServeConfig.model_validate(data).registry_url()
        for a in data["adapters"]:
            if not a["source"].startswith("models:"):
                a["source"] = str(root / Path(a["source"]).expanduser())
        return ServeConfig.model_validate(data)


def _absolute_sqlite(uri: Optional[str], root: Path) -> Optional[str]:
    """A relative ``sqlite:///file.db`` URL made absolute against ``root``; other URLs unchanged."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{root / uri[len('sqlite:///'):]}"
    return uri


def serve_app_args(data: dict, source: str) -> tuple[dict, dict]:
    """Split a Ray Serve config file into (ServeConfig data, http_options).

    A file with top-level ``applications`` is a Serve config: the first application whose
    ``import_path`` is lorafleet's builder gives the args. Anything else is a bare ServeConfig.
    """
    if "applications" not in data:
        return data, {}
    apps = [a for a in data.get("applications") or [] if isinstance(a, dict) and a.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        raise ConfigError(source, [f"no application with import_path: {APP_IMPORT_PATH} in this Serve config file"])
    return dict(apps[0].get("args") or {}), dict(data.get("http_options") or {})


def load_serve_config(path: str | Path, overrides: Iterable[str] = ()) -> ServeConfig:
    """Read ``path`` (a Serve config file or a bare ServeConfig YAML), apply ``--set`` overrides, validate.

    Overrides use ServeConfig paths (``port=8001``, ``engine.max_loras=8``). A Serve file's
    ``http_options`` host/port fill ``host``/``port`` when the args leave them unset.
    """
    data = read_yaml(path)
    args, http = serve_app_args(data, str(path))
    for key in ("host", "port"):
        if key in http and key not in args:
            args[key] = http[key]
    args, errors = apply_overrides(args, overrides)
    return validate_config(ServeConfig, args, str(path), errors)
