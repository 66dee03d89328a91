"""Chat requests to an adapter that carries its training prompt format (``lorafleet_prompt.json``).

The last user message is rendered through the adapter's template
(:func:`lorafleet.data.prompt_format.render_prompt`), encoded as training encodes it and run as a
completion by vLLM's own completion serving class, so the tokens the engine sees are exactly
those training and ``lorafleet eval`` feed the model; the answer is converted back to a
``chat.completion`` (or ``chat.completion.chunk`` events when streaming). Chat-only features
that have no completion equivalent (tools, chat logprobs) are refused with a 400.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from lorafleet.data.prompt_format import render_prompt
from lorafleet.serve.errors import bad_request

# Chat fields not carried over: the conversation itself, and fields whose meaning differs between the two APIs.
_NOT_CARRIED = {"messages", "prompt", "logprobs", "top_logprobs", "echo", "max_tokens", "max_completion_tokens"}


def as_completion(request, fmt: dict, tokenizer):
    """The ``CompletionRequest`` equivalent to chat ``request`` for an adapter with prompt format ``fmt``.

    Its prompt is token ids, encoded as training and ``lorafleet eval`` encode prompts (``encode_prompts``:
    bos + prompt): the prompt as text would lose the bos of a tokenizer that has one but does not add it
    (lorafleet's own bases, GPT-2-style tokenizers), and with it accuracy (banking77 on the serve tests'
    tiny base: 0.51 served against 0.61 offline; tests/serve/test_prompt_accuracy.py).
    """
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from lorafleet.data.tokenize import encode_prompts

    if request.tools and request.tool_choice != "none":
        raise bad_request("This adapter was trained on a fixed prompt format and cannot call tools.", "tools", "prompt_format")
    if request.logprobs:
        raise bad_request("Chat logprobs are not available for an adapter with a prompt format; "
                          "use /v1/completions with the rendered prompt.", "logprobs", "prompt_format")
    try:
        prompt = render_prompt(fmt, list(request.messages))
    except ValueError as exc:
        raise bad_request(f"{exc} (adapter trained on task {fmt['task']!r}: {fmt['template']!r})", "messages", "prompt_format") from None
    fields = request.model_dump(exclude_unset=True)
    kept = {k: v for k, v in fields.items() if k in CompletionRequest.model_fields and k not in _NOT_CARRIED}
    completion = CompletionRequest(prompt=encode_prompts(tokenizer, [prompt])[0], **kept)
    # chat semantics: no limit given means up to the model's length (a completion's default would be 16 tokens)
    completion.max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return completion


def chat_response(result):
    """A ``CompletionResponse`` as the ``ChatCompletionResponse`` a chat caller expects."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage

    choices = [ChatCompletionResponseChoice(index=c.index, message=ChatMessage(role="assistant", content=c.text),
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason, token_ids=c.token_ids)
               for c in result.choices]
    # return_token_ids: a completion gives the prompt's ids per choice, a chat response once beside them
    prompt_ids = next((c.prompt_token_ids for c in result.choices if c.prompt_token_ids is not None), None)
    return ChatCompletionResponse(id=_chat_id(result.id), created=result.created, model=result.model, choices=choices,
                                  usage=result.usage, prompt_token_ids=prompt_ids)


async def chat_chunks(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """vLLM's ``text_completion`` SSE events as ``chat.completion.chunk`` events (the first delta of each
    choice carries the assistant role); usage, errors and ``[DONE]`` pass through in the same shape."""
    opened: set[int] = set()
    async for chunk in chunks:
        if not chunk.startswith("data: {"):
            yield chunk
            continue
        body = json.loads(chunk[len("data: "):])
        if body.get("object") != "text_completion":
            yield chunk
            continue
        choices, prompt_ids = [], None
        for c in body.get("choices", []):
            delta = {"content": c["text"]} if c["index"] in opened else {"role": "assistant", "content": c["text"]}
            opened.add(c["index"])
            prompt_ids = prompt_ids or c.get("prompt_token_ids")
            choice = {"index": c["index"], "delta": delta, "logprobs": None,
                      "finish_reason": c.get("finish_reason"), "stop_reason": c.get("stop_reason")}
            if c.get("token_ids") is not None:  # return_token_ids: this chunk's new tokens
                choice["token_ids"] = c["token_ids"]
            choices.append(choice)
        body.update(id=_chat_id(body.get("id", "")), object="chat.completion.chunk", choices=choices)
        if prompt_ids is not None:  # return_token_ids: the first chunk carries the prompt's ids, as in vLLM's chat stream
            body["prompt_token_ids"] = prompt_ids
        yield f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chat_id(completion_id: str) -> str:
    return "chatcmpl-" + completion_id.removeprefix("cmpl-")
