"""vLLM's engine and vLLM's own OpenAI serving classes, in the replica that answers HTTP.

:class:`Frontend` starts one ``AsyncLLM`` with LoRA enabled and builds vLLM's OpenAI layer
around it with vLLM's own ``init_app_state`` (the same call ``vllm serve`` and
``ray.serve.llm`` make), so request models, sampling parameters, chat templates, tool
parsing, structured outputs, logprobs, streaming, usage and errors are vLLM's.

lorafleet's one seam into it is :meth:`Frontend.bind`: the adapter version lorafleet admitted
for a request becomes a ``LoRARequest`` in ``OpenAIServingModels.lora_requests`` (vLLM's
public table of servable adapters) under a name unique to that version, and the request's
``model`` is set to that name. vLLM never resolves an adapter name on its own (no
``LoRAResolver`` is registered and runtime LoRA updating stays off), so nothing reaches the
engine that lorafleet did not admit. The name the caller used is put back into the response.
A chat request to an adapter whose folder carries its training prompt format runs as a
completion of the rendered training prompt (:mod:`.prompted`).

Example::

    frontend = await Frontend.start(cfg, replica="r1")
    result = await frontend.complete(request, raw_request, adapter, shown="intent")
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator, Optional

from lorafleet.serve.adapters import Adapter, AdapterCatalog, AdapterStore
from lorafleet.serve.config import ServeConfig
from lorafleet.serve.engine import engine_setup, frontend_args
from lorafleet.serve.prompted import as_completion, chat_chunks, chat_response
from lorafleet.serve.slots import LoRASlots
from lorafleet.serve.validation import read_prompt

log = logging.getLogger(__name__)


class Frontend:
    """The engine of one replica with vLLM's OpenAI serving objects. Build it with :meth:`start` (tens of seconds)."""

    def __init__(self, cfg: ServeConfig, engine, state, catalog: AdapterCatalog, replica: str, cpu_lora_patch: Optional[dict] = None):
        self.cfg, self.engine, self.catalog, self.replica = cfg, engine, catalog, replica
        self.models = state.openai_serving_models
        self.completions = state.openai_serving_completion
        self.chat = state.openai_serving_chat
        self.tokenization = state.serving_tokenization
        self.max_model_len: int = engine.model_config.max_model_len
        self.cpu_lora_patch = cpu_lora_patch  # what the engine's worker says of vllm_cpu_lora's patch (/admin/engines)
        self.slots = LoRASlots(engine, cfg.engine.max_loras, catalog.store.ensure_local)
        # lora id -> the name metrics show (config adapters now; runtime versions as they arrive)
        self.adapter_names = {catalog.lora_id(n): n for n in catalog.names}
        self._loaded: set[int] = set()
        self._loads: dict[str, int] = {}
        self._evictions: dict[str, int] = {}
        self._refresh_task: Optional[asyncio.Task] = None
        self._prompt_formats: dict[str, Optional[dict]] = {}  # content hash -> the adapter's checked prompt format

    @classmethod
    async def start(cls, cfg: ServeConfig, replica: str = "local") -> "Frontend":
        """Resolve adapters (when configured to), start vLLM's AsyncLLM, build vLLM's OpenAI serving state."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.v1.engine.async_llm import AsyncLLM

        catalog = AdapterCatalog(cfg, AdapterStore(cfg))
        if cfg.download_adapters_at_start:
            for name in catalog.names:
                await asyncio.to_thread(catalog.resolve, name)
        setup = engine_setup(cfg)
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        # vLLM's Prometheus metrics (running/waiting requests, KV cache, LoRA adapters, TTFT, ITL)
        # without its periodic log lines: a custom stat logger turns stats on, the default logging one stays off.
        engine = AsyncLLM.from_engine_args(setup.args, stat_loggers=[PrometheusStatLogger])
        state = State()
        await init_app_state(engine, state, frontend_args(cfg, setup), supported_tasks=("generate",))
        # CPU: the worker extension (vllm_cpu_lora.py) says whether vLLM's CPU LoRA ops are patched in the worker
        patch = (await engine.collective_rpc("lorafleet_cpu_lora_patch_state"))[0] if setup.args.worker_extension_cls else None
        return cls(cfg, engine, state, catalog, replica, patch)

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def check_health(self) -> None:
        """Raises when the engine core is dead (Serve then restarts the replica)."""
        await self.engine.check_health()

    # ------------------------------------------------------------------ the seam

    def bind(self, request, adapter: Optional[Adapter]) -> Optional[Adapter]:
        """Point ``request.model`` at exactly ``adapter`` (None: the base, no LoRARequest) for vLLM; returns ``adapter``."""
        if adapter is None:
            request.model = self.cfg.base_model_name
            return None
        lora_request = adapter.lora_request()
        self.models.lora_requests.setdefault(lora_request.lora_name, lora_request)
        request.model = lora_request.lora_name
        return adapter

    def forget(self, live: set[int]) -> None:
        """Drop the entries of retired adapter versions from vLLM's table (the engine drops their weights: slots.py)."""
        for name, lora_request in list(self.models.lora_requests.items()):
            if lora_request.lora_int_id not in live:
                del self.models.lora_requests[name]

    async def generate(self, kind: str, request, raw_request, adapter: Optional[Adapter], shown: str):
        """Run a completions or chat request on ``adapter``; vLLM's ``ErrorResponse``, response object, or SSE strings.

        The response's ``model`` (every streamed chunk's too) is ``shown``, the caller's name. A
        slot is held (LoRASlots: pins) from before the engine sees the request until its stream ends.
        """
        lora = self.bind(request, adapter)
        internal = request.model
        prompted = kind == "chat" and lora is not None and (self.prompt_format(lora) or {}).get("template") is not None  # null: base template
        if prompted:
            request, kind = as_completion(request, self.prompt_format(lora), self.engine.tokenizer), "completions"
        serving = self.chat.create_chat_completion if kind == "chat" else self.completions.create_completion
        slot = self.slots.use(lora)
        await slot.__aenter__()
        try:
            result = await serving(request, raw_request)
        except BaseException:
            await slot.__aexit__(None, None, None)
            self._schedule_lora_refresh()
            raise
        if hasattr(result, "__aiter__"):
            return self._stream(chat_chunks(result) if prompted else result, slot, internal, shown)
        await slot.__aexit__(None, None, None)
        self._schedule_lora_refresh()
        if hasattr(result, "model") and not hasattr(result, "error"):
            result = chat_response(result) if prompted else result
            result.model = shown
        return result

    def prompt_format(self, adapter: Adapter) -> Optional[dict]:
        """The training prompt format in the adapter's folder (checked when the version was admitted), or None."""
        key = adapter.content_hash or adapter.path
        if key not in self._prompt_formats:
            self._prompt_formats[key] = read_prompt(Path(adapter.path))
        return self._prompt_formats[key]

    async def _stream(self, chunks: AsyncIterator[str], slot, internal: str, shown: str) -> AsyncIterator[str]:
        # vLLM writes each chunk with pydantic's compact JSON: `"model":"<name>"`.
        old, new = f'"model":{json.dumps(internal)}', f'"model":{json.dumps(shown)}'
        try:
            async for chunk in chunks:
                yield chunk.replace(old, new, 1) if internal != shown else chunk
        finally:
            await slot.__aexit__(None, None, None)
            self._schedule_lora_refresh()

    # ------------------------------------------------------------------ adapter activity

    def _schedule_lora_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.ensure_future(self.refresh_lora_activity())

    async def refresh_lora_activity(self) -> None:
        """Compare vLLM's loaded adapter ids with the last look: new ids were loaded, missing ones evicted."""
        try:
            loaded = set(await self.engine.list_loras())
        except Exception as exc:  # noqa: BLE001 - metrics must never fail a request
            log.debug("list_loras failed: %s", exc)
            return
        for counts, ids in ((self._loads, loaded - self._loaded), (self._evictions, self._loaded - loaded)):
            for name in (self.adapter_names[i] for i in ids if i in self.adapter_names):
                counts[name] = counts.get(name, 0) + 1
        self._loaded = loaded

    def adapter_activity(self) -> dict:
        """Cumulative adapter loads/evictions seen on this replica and what is loaded now."""
        return {"loads": dict(self._loads), "evictions": dict(self._evictions),
                "loaded": sorted(self.adapter_names[i] for i in self._loaded if i in self.adapter_names)}

