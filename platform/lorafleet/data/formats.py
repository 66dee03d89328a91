"""Conversation formats people already have, read into OpenAI chat ``messages`` and rendered into
training segments (which text is context, which is trained on).

Formats (``data.format``; ``auto`` picks one per file from its columns):

- ``openai``: ``messages: [{role, content, weight?}]`` (what a fine-tuning API receives); an
  assistant message with ``weight: 0`` is context, not trained on.
- ``sharegpt``: ``conversations: [{from, value}]`` with ``human``/``gpt``/``system``, plus an
  optional ``system`` column.
- ``alpaca``: ``instruction``, optional ``input``, ``output`` (optional ``system``).
- ``prompt_completion``: ``prompt`` and ``completion`` (text, or lists of messages).
- ``guanaco``: ``text`` as ``### Human: ... ### Assistant: ...``, kept verbatim.

Example::

    >>> msgs = to_messages("alpaca", {"instruction": "Add", "input": "2+2", "output": "4"})
    >>> [(m["role"], m["content"]) for m in msgs]
    [('user', 'Add\\n\\n2+2'), ('assistant', '4')]

:func:`conversation_segments` turns messages into ``[(text, trained), ...]`` whose concatenation
is the rendered conversation up to its last trained assistant turn. With a chat template the
text of each turn is found by rendering prefixes (``messages[:i]`` with the generation prompt,
then ``messages[:i+1]``), which works for any template that renders a conversation as the
prefix of its continuation (for the templates that do not, such as Qwen3's, trl's training
version of the template is used); without one, the plain ``### Human: / ### Assistant:`` layout.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from lorafleet.data.rows import ASSISTANT_MARKER, HUMAN_MARKER, BadRow, is_empty

FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "alpaca", "prompt_completion", "guanaco")
LOSS_ON: tuple[str, ...] = ("all_assistant_turns", "last_assistant_turn")

# Columns each format reads: (required, optional). data.columns may map any of them to another column.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "openai": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "guanaco": (("text",), ()),
}

_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}
_PLAIN_ROLE = {"user": "Human", "assistant": "Assistant", "system": "System"}

Segments = tuple[tuple[str, bool], ...]


def detect_format(found: list[str], columns: dict[str, str]) -> str:
    """The format of a file from its columns (and data.columns renames); ``ValueError`` naming the choices."""
    has = set(found) | set(columns)
    if "messages" in has:
        return "openai"
    if "conversations" in has:
        return "sharegpt"
    if {"instruction", "output"} <= has:
        return "alpaca"
    if {"prompt", "completion"} <= has:
        return "prompt_completion"
    if "text" in has:
        return "guanaco"
    raise ValueError(f"cannot tell the chat format from columns {found}: expected `messages` (openai), "
                     "`conversations` (sharegpt), `instruction`+`output` (alpaca), `prompt`+`completion` "
                     "(prompt_completion) or guanaco `text`; set data.format, or map columns with data.columns")


def _content(value: Any, i: int) -> str:
    """Message content as text: a string, or OpenAI content parts of type text."""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise BadRow("bad_messages", f"message {i}: only text content parts can be trained on, got {value!r:.120}")
        value = "".join(str(p.get("text", "")) for p in value)
    if is_empty(value):
        raise BadRow("bad_messages", f"message {i} needs non-empty content")
    return str(value).strip()


def parse_messages(value: Any, start: int = 0) -> list[dict[str, Any]]:
    """``[{role, content, weight}]`` from OpenAI ``{role, content, weight?}`` or ShareGPT ``{from, value}``
    items (``weight`` 1 unless an assistant message says 0); :class:`BadRow` (``bad_messages``) otherwise."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("bad_messages", f"messages are a string but not a JSON list: {value[:80]!r}") from None
    if not isinstance(value, list):
        raise BadRow("bad_messages", f"field 'messages' must be a list of {{role, content}}, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value, start):
        if not isinstance(m, dict):
            raise BadRow("bad_messages", f"message {i} must be a mapping with role and content, got {type(m).__name__}")
        role = _ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or is_empty(content):
            raise BadRow("bad_messages", f"message {i} needs a role (user/assistant/system) and non-empty content, got {m!r}")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool) or (weight == 0 and role != "assistant"):
            raise BadRow("bad_messages", f"message {i}: weight must be 0 or 1, and only on assistant messages, got {weight!r}")
        out.append({"role": role, "content": _content(content, i), "weight": int(weight)})
    return out


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if is_empty(value):
        raise BadRow("empty_field", f"field {name!r} is empty (got {value!r})")
    return str(value).strip()


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = row.get("system")
    if is_empty(system) or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": str(system).strip(), "weight": 1}] + messages


def to_messages(fmt: str, row: dict) -> Any:
    """The row as a list of messages; guanaco text (or a ``messages`` field holding such text) stays a string."""
    if fmt in ("openai", "guanaco"):
        value = row.get("messages") if fmt == "openai" else row.get("text")
        if value is None and fmt == "openai":
            value = row.get("text")  # the chat task's fallback column
        if is_empty(value) or value == []:
            raise BadRow("empty_field", f"field 'messages' (or 'text') is empty (got {value!r})")
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # not JSON after all: guanaco text
        return value if isinstance(value, str) else parse_messages(value)
    if fmt == "sharegpt":
        value = row.get("conversations")
        if is_empty(value) or value == []:
            raise BadRow("empty_field", f"field 'conversations' is empty (got {value!r})")
        return _with_system(row, parse_messages(value))
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = row.get("input")
        user = f"{instruction}\n\n{str(extra).strip()}" if not is_empty(extra) else instruction
        return _with_system(row, [{"role": "user", "content": user, "weight": 1},
                                  {"role": "assistant", "content": output, "weight": 1}])
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        head = parse_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": _text(row, "prompt"), "weight": 1}]
        tail = (parse_messages(completion, len(head)) if isinstance(completion, list)
                else [{"role": "assistant", "content": _text(row, "completion"), "weight": 1}])
        return head + tail
    raise ValueError(f"unknown data.format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _trained_turns(messages: list[dict], loss_on: str) -> list[int]:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    if not turns or turns[-1] == 0:
        raise BadRow("no_assistant_turn", "messages need at least one turn before a trained (weight not 0) assistant turn")
    turns = [i for i in turns if i > 0]  # an opening assistant turn has nothing to answer
    return turns if loss_on == "all_assistant_turns" else turns[-1:]


_TRAINING_TEMPLATES: dict[str, Optional[str]] = {}


def training_template(tokenizer: Any) -> Optional[str]:
    """trl's training version of the tokenizer's chat template when trl patches it (a template that
    re-renders earlier turns differently, as Qwen3's drops their think blocks, made prefix-preserving),
    else None: the template's own rendering is used (any prefix-preserving template works as is)."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None
    if template not in _TRAINING_TEMPLATES:
        try:
            from trl.chat_template_utils import get_training_chat_template

            _TRAINING_TEMPLATES[template] = get_training_chat_template(tokenizer)
        except (ImportError, ValueError):  # no trl, or a template trl has no training version of
            _TRAINING_TEMPLATES[template] = None
    return _TRAINING_TEMPLATES[template]


def _render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation,
                                             chat_template=training_template(tokenizer))
    except Exception as exc:  # jinja's TemplateError: e.g. roles that do not alternate
        raise BadRow("bad_messages", f"the chat template refused this conversation: {exc}") from None


def _template_segments(tokenizer: Any, messages: list[dict], turns: list[int]) -> list[tuple[str, bool]]:
    segments, done = [], ""
    for i in turns:
        before = _render(tokenizer, messages[:i], True)
        after = _render(tokenizer, messages[:i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise BadRow("template_not_incremental",
                         "the chat template does not render this conversation as a prefix of its continuation, so "
                         "its turns cannot be told apart; set data.loss_on: last_assistant_turn")
        reply = after[len(before):].rstrip()  # trailing whitespace goes to the next turn's context
        segments += [(before[len(done):], False), (reply, True)]
        done = before + reply
    return segments


def _plain_segments(messages: list[dict], turns: list[int]) -> list[tuple[str, bool]]:
    segments, context = [], []
    for i, m in enumerate(messages[:turns[-1] + 1]):
        if i in turns:
            head = "".join(line + "\n" for line in context) + ASSISTANT_MARKER
            segments += [(("\n" if segments else "") + head, False), (" " + m["content"], True)]
            context = []
        else:
            context.append(f"### {_PLAIN_ROLE[m['role']]}: {m['content']}")
    return segments


def _guanaco_segments(text: str, loss_on: str) -> list[tuple[str, bool]]:
    cut = text.rfind(ASSISTANT_MARKER)
    reply = text[cut + len(ASSISTANT_MARKER):].strip() if cut >= 0 else ""
    if cut <= 0 or not reply or not text[:cut].strip():
        raise BadRow("no_assistant_turn", f"chat text needs '{HUMAN_MARKER} ... {ASSISTANT_MARKER} ...' "
                                          f"with a non-empty reply, got {text[:80]!r}")
    spans = []  # (start, end) of the earlier non-empty replies, each up to the next marker
    if loss_on == "all_assistant_turns":
        marks = sorted([(p, HUMAN_MARKER) for p in _find_all(text[:cut], HUMAN_MARKER)]
                       + [(p, ASSISTANT_MARKER) for p in _find_all(text[:cut], ASSISTANT_MARKER)]) + [(cut, "")]
        for (pos, mark), (nxt, _) in zip(marks, marks[1:]):
            start = pos + len(mark)
            if mark == ASSISTANT_MARKER and text[:pos].strip() and text[start:nxt].strip():
                spans.append((start, start + len(text[start:nxt].rstrip())))
    segments, done = [], 0
    for start, end in spans:
        segments += [(text[done:start], False), (text[start:end], True)]
        done = end
    return segments + [(text[done:cut + len(ASSISTANT_MARKER)], False), (" " + reply, True)]


def _find_all(text: str, marker: str) -> list[int]:
    out, pos = [], text.find(marker)
    while pos >= 0:
        out.append(pos)
        pos = text.find(marker, pos + len(marker))
    return out


def renders_with_template(conversation: Any, tokenizer: Any) -> bool:
    """Whether ``conversation`` (messages, or guanaco text) is rendered by the tokenizer's chat template."""
    return not isinstance(conversation, str) and tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def conversation_segments(conversation: Any, tokenizer: Any, loss_on: str) -> tuple[str, str, str, Segments]:
    """``(prompt, completion, input, segments)`` of a conversation (messages or guanaco text).

    ``prompt``/``completion`` are the context and reply of the last trained assistant turn (what
    evaluation generates and scores); ``input`` its last user message; ``segments`` the whole
    conversation up to that reply, each piece marked trained or not (``loss_on`` picks the turns).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown data.loss_on {loss_on!r}; expected one of {', '.join(LOSS_ON)}")
    if isinstance(conversation, str):
        segments = _guanaco_segments(conversation, loss_on)
        prompt = "".join(text for text, _ in segments[:-1])
        head = prompt[: -len(ASSISTANT_MARKER)]
        last_human = head.rfind(HUMAN_MARKER)
        shown = (head[last_human + len(HUMAN_MARKER):] if last_human >= 0 else head).strip()
        return prompt, segments[-1][0], shown, tuple(segments)
    turns = _trained_turns(conversation, loss_on)
    last = turns[-1]
    users = [m["content"] for m in conversation[:last] if m["role"] == "user"]
    shown = users[-1] if users else conversation[last - 1]["content"]
    if renders_with_template(conversation, tokenizer):
        segments = _template_segments(tokenizer, conversation, turns)
        prompt = "".join(text for text, _ in segments[:-1])
        return prompt, conversation[last]["content"], shown, tuple(segments)
    segments = _plain_segments(conversation, turns)
    return "".join(text for text, _ in segments[:-1]), segments[-1][0], shown, tuple(segments)
