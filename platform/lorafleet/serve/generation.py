"""One vLLM async engine serving the base model and every adapter, spoken to in OpenAI terms.

:class:`AdapterEngine` turns a validated OpenAI request plus the resolved :class:`Adapter`
(or None for the base) into ``AsyncLLM.generate`` calls, one per prompt, each carrying the
adapter's ``LoRARequest``. vLLM batches requests of different adapters together and keeps
loaded adapters in its own LRU (``max_loras`` slots, ``max_cpu_loras`` in host memory);
nothing here serialises or caches adapters.

It yields plain dicts, so the Ray Serve deployment can pass them through a handle:
``{"chunk": <OpenAI chunk>}`` while streaming, ``{"response": <OpenAI response>}`` when not,
and always a last ``{"meta": {...}}`` with usage, time to first token and the replica's
adapter activity, which the ingress turns into metrics and strips.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from lorafleet.serve.adapters import Adapter, AdapterCatalog, AdapterStore
from lorafleet.serve.config import ServeConfig
from lorafleet.serve.engine import EngineSetup, engine_setup
from lorafleet.serve.slots import LoRASlots
from lorafleet.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    bad_request,
    finish_reason,
    new_id,
    now,
    overloaded,
    usage,
)

log = logging.getLogger(__name__)

Request = Union[CompletionRequest, ChatCompletionRequest]


@dataclass
class _Choice:
    """What one choice (prompt i, sample j) has produced so far."""

    index: int
    text: str = ""
    token_count: int = 0
    started: bool = False
    text_offset: int = 0
    finish_reason: Optional[str] = None
    logprobs: dict = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "content": []})


class AdapterEngine:
    """The engine of one replica. Build it with :meth:`start` (tens of seconds)."""

    def __init__(self, cfg: ServeConfig, setup: EngineSetup, engine, tokenizer, catalog: AdapterCatalog, replica: str,
                 base_stand_in: Optional[Adapter] = None):
        self.cfg, self.setup, self.engine, self.tokenizer, self.catalog, self.replica = cfg, setup, engine, tokenizer, catalog, replica
        self.max_model_len: int = engine.model_config.max_model_len
        self.vocab_size = len(tokenizer)
        self.base_stand_in = base_stand_in
        self.slots = LoRASlots(engine, cfg.engine.max_loras, catalog.store.ensure_local)
        # lora id -> the name metrics show (config adapters now; runtime versions as they arrive)
        self.adapter_names = {catalog.lora_id(n): n for n in catalog.names}
        self._loaded: set[int] = set()
        self._loads: dict[str, int] = {}
        self._evictions: dict[str, int] = {}
        self._refresh_task: Optional[asyncio.Task] = None
        # One thread for tokenisation: off the event loop (long prompts must not stall other
        # streams) and never concurrent (a fast tokenizer used from two threads can fail with
        # "Already borrowed").
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="lorafleet-tokenize")

    @classmethod
    async def start(cls, cfg: ServeConfig, replica: str = "local") -> "AdapterEngine":
        """Resolve adapters (when configured to), then start vLLM's AsyncLLM with LoRA enabled."""
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        catalog = AdapterCatalog(cfg, AdapterStore(cfg))
        if cfg.download_adapters_at_start:
            for name in catalog.names:
                await asyncio.to_thread(catalog.resolve, name)
        setup = engine_setup(cfg)
        stand_in = await asyncio.to_thread(catalog.store.base_stand_in, catalog.stand_in_id) if setup.base_through_zero_adapter else None
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, cfg.tokenizer or cfg.model)
        engine = AsyncLLM.from_engine_args(setup.args)
        return cls(cfg, setup, engine, tokenizer, catalog, replica, stand_in)

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._tokenizer_thread.shutdown(wait=False)

    async def check_health(self) -> None:
        """Raises when the engine core is dead (Serve then restarts the replica)."""
        await self.engine.check_health()

    # ------------------------------------------------------------------ prompts

    def _encode_prompts(self, request: Request) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (completions may send several, or token ids)."""
        if isinstance(request, ChatCompletionRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise bad_request(f"The model `{self.cfg.base_model_name}` has no chat template in its tokenizer, so /v1/chat/completions "
                                  "cannot format messages; use /v1/completions with a plain prompt.", "messages", "no_chat_template")
            text = self.tokenizer.apply_chat_template(request.template_messages(), tokenize=False, add_generation_prompt=True)
            return [self.tokenizer(text, add_special_tokens=False).input_ids], [text]
        prompts = request.prompts()
        if len(prompts) > self.cfg.limits.max_n:
            raise bad_request(f"At most {self.cfg.limits.max_n} prompts per request (got {len(prompts)}).", "prompt")
        ids, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                ids.append(self.tokenizer(p).input_ids)
                texts.append(p)
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise bad_request(f"Token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1}).", "prompt")
                ids.append(list(p))
                texts.append(self.tokenizer.decode(p))
        if any(not x for x in ids):
            raise bad_request("A prompt is empty after tokenisation.", "prompt")
        return ids, texts

    def _max_tokens(self, request: Request, prompt_ids: list[list[int]]) -> int:
        """The completion budget, checked against the server cap and the context length."""
        kind_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        requested = request.requested_max_tokens() if isinstance(request, ChatCompletionRequest) else request.max_tokens
        cap = self.cfg.limits.max_tokens
        if requested is not None and requested > cap:
            raise bad_request(f"max_tokens ({requested}) is above this server's limit of {cap}.", "max_tokens", "max_tokens_too_large")
        longest = max(len(ids) for ids in prompt_ids)
        room = self.max_model_len - longest
        if room <= 0 or (requested is not None and requested > room):
            completion = requested if requested is not None else 1
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{longest + completion} tokens ({longest} in the {kind_param}, {completion} in the completion). "
                f"Please reduce the length of the {kind_param} or completion.", kind_param, "context_length_exceeded")
        return requested if requested is not None else min(cap, room)

    def _sampling_params(self, request: Request, max_tokens: int):
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if request.n > self.cfg.limits.max_n:
            raise bad_request(f"n ({request.n}) is above this server's limit of {self.cfg.limits.max_n}.", "n")
        if isinstance(request, ChatCompletionRequest):
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
        else:
            logprobs = request.logprobs
        logit_bias = None
        if request.logit_bias:
            logit_bias = {int(k): float(v) for k, v in request.logit_bias.items()}
            bad = [k for k in logit_bias if k >= self.vocab_size]
            if bad:
                raise bad_request(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1}).", "logit_bias")
        try:
            return SamplingParams(
                n=request.n, temperature=request.temperature, top_p=request.top_p, max_tokens=max_tokens,
                stop=request.stop_list() or None, seed=request.seed, presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty, logit_bias=logit_bias, logprobs=logprobs,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own checks (e.g. greedy sampling needs n=1)
            raise bad_request(f"Invalid sampling parameters: {exc}", getattr(exc, "parameter", None)) from None

    # ------------------------------------------------------------------ generation

    async def generate(self, request: Request, adapter: Optional[Adapter]) -> AsyncIterator[dict]:
        """Run ``request`` on the base (``adapter`` None) or the adapter; yield chunks/response, then meta.

        Every check that can reject the request runs before the first item is yielded, so a
        caller that waits for the first item can still answer with an HTTP error status. A
        request waits here (before the engine) while the adapter has no free slot (see slots.py).
        """
        kind = "chat" if isinstance(request, ChatCompletionRequest) else "completions"
        started = time.monotonic()
        prompt_ids, prompt_texts = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self._encode_prompts, request)
        max_tokens = self._max_tokens(request, prompt_ids)
        params = self._sampling_params(request, max_tokens)
        lora_adapter = adapter if adapter is not None else self.base_stand_in
        async with self.slots.use(lora_adapter), contextlib.aclosing(
                self._generate(kind, request, prompt_ids, prompt_texts, params, lora_adapter, started)) as items:
            async for item in items:
                yield item

    async def _generate(self, kind: str, request: Request, prompt_ids: list[list[int]], prompt_texts: list[str], params,
                        lora_adapter: Optional[Adapter], started: float) -> AsyncIterator[dict]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.utils.async_utils import merge_async_iterators
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = lora_adapter.lora_request() if lora_adapter is not None else None
        response_id, created, model = new_id(kind), now(), request.model
        streams = []
        for i, ids in enumerate(prompt_ids):
            (engine_input,) = await self.engine.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
            streams.append(self.engine.generate(engine_input, params, f"{response_id}-{i}", lora_request=lora))
        choices = {}
        for i in range(len(prompt_ids)):
            for j in range(request.n):
                choices[i * request.n + j] = _Choice(i * request.n + j)
        first_token_s: Optional[float] = None
        try:
            async for prompt_index, output in merge_async_iterators(*streams):
                deltas = []
                for out in output.outputs:
                    choice = choices[prompt_index * request.n + out.index]
                    text, first = out.text, not choice.started
                    if first and kind == "completions" and request.echo:
                        text = prompt_texts[prompt_index] + text
                    if out.token_ids and first_token_s is None:
                        first_token_s = time.monotonic() - started
                    logprobs = self._logprobs(kind, choice, out, params.logprobs) if params.logprobs is not None else None
                    choice.text += text
                    choice.token_count += len(out.token_ids)
                    choice.finish_reason = finish_reason(out.finish_reason)
                    choice.started = True
                    deltas.append((choice, text, logprobs, first))
                if request.stream and deltas:
                    yield {"chunk": self._chunk(kind, response_id, created, model, deltas)}
        except VLLMClientError as exc:
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from None
        except GracefulHTTPError as exc:
            raise OpenAIError(int(exc.http_status), exc.message, "server_error", None, "overloaded") from None
        except EngineDeadError:
            raise overloaded("The inference engine of this replica failed and is being restarted; retry the request.") from None
        finally:
            self._schedule_lora_refresh()

        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        completion_tokens = sum(c.token_count for c in choices.values())
        use = usage(prompt_tokens, completion_tokens)
        if not request.stream:
            yield {"response": self._response(kind, response_id, created, model, list(choices.values()), params.logprobs is not None, use)}
        elif request.stream_options and request.stream_options.include_usage:
            obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
            yield {"chunk": {"id": response_id, "object": obj, "created": created, "model": model, "choices": [], "usage": use}}
        yield {"meta": {"usage": use, "ttft_s": first_token_s, "latency_s": time.monotonic() - started, "replica": self.replica,
                        "adapters": self.adapter_activity()}}

    def _logprobs(self, kind: str, choice: _Choice, out, k: int) -> dict:
        """This delta's logprobs in OpenAI's shape (completions: token lists; chat: content entries).

        vLLM gives, per position, the ``k`` most likely tokens plus the sampled one when it is
        not among them; OpenAI's completions keep both (up to k+1), chat's top_logprobs the k.
        """
        delta = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "content": []}
        for token_id, position in zip(out.token_ids, out.logprobs or []):
            chosen = position.get(token_id)
            token = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else self.tokenizer.decode([token_id])
            logprob = max(chosen.logprob, -9999.0) if chosen is not None else -9999.0
            top = [(tid, lp) for tid, lp in sorted(position.items(), key=lambda kv: kv[1].rank or 0) if (lp.rank or 0) <= k]
            if kind == "completions":
                delta["tokens"].append(token)
                delta["token_logprobs"].append(logprob)
                entries = {(lp.decoded_token or ""): max(lp.logprob, -9999.0) for _, lp in top}
                entries.setdefault(token, logprob)
                delta["top_logprobs"].append(entries)
                delta["text_offset"].append(choice.text_offset)
            else:
                delta["content"].append({
                    "token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [{"token": lp.decoded_token or "", "logprob": max(lp.logprob, -9999.0),
                                      "bytes": list((lp.decoded_token or "").encode("utf-8"))} for _, lp in top[:k]],
                })
            choice.text_offset += len(token)
        for key, values in delta.items():
            choice.logprobs[key].extend(values)
        if kind == "completions":
            return {k_: delta[k_] for k_ in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        return {"content": delta["content"]}

    def _chunk(self, kind: str, response_id: str, created: int, model: str, deltas: list) -> dict:
        out = []
        for choice, text, logprobs, first in deltas:
            if kind == "completions":
                out.append({"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                out.append({"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": choice.finish_reason})
        obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
        return {"id": response_id, "object": obj, "created": created, "model": model, "choices": out}

    @staticmethod
    def _response(kind: str, response_id: str, created: int, model: str, choices: list[_Choice], with_logprobs: bool, use: dict) -> dict:
        if kind == "completions":
            items = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                      "logprobs": {k: c.logprobs[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")} if with_logprobs else None}
                     for c in choices]
            return {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": items, "usage": use}
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                  "logprobs": {"content": c.logprobs["content"]} if with_logprobs else None}
                 for c in choices]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model, "choices": items, "usage": use}

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
        for lora_id in loaded - self._loaded:
            if lora_id in self.adapter_names:
                name = self.adapter_names[lora_id]
                self._loads[name] = self._loads.get(name, 0) + 1
        for lora_id in self._loaded - loaded:
            if lora_id in self.adapter_names:
                name = self.adapter_names[lora_id]
                self._evictions[name] = self._evictions.get(name, 0) + 1
        self._loaded = loaded

    def adapter_activity(self) -> dict:
        """Cumulative adapter loads/evictions seen on this replica and what is loaded now."""
        return {"loads": dict(self._loads), "evictions": dict(self._evictions),
                "loaded": sorted(self.adapter_names[i] for i in self._loaded if i in self.adapter_names)}
