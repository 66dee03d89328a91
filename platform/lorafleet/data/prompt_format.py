"""The prompt format an adapter was trained on, saved in its folder so that serving can apply it.

Training writes ``lorafleet_prompt.json`` beside ``adapter_config.json`` (from the task's
:meth:`~lorafleet.data.tasks.TaskSpec.prompt_format`); the server reads it when it admits an
adapter version and turns a chat request's last user message into the training prompt::

    {"format_version": 1, "task": "banking77", "kind": "classification",
     "template": "Query: {text}\\nIntent:", "fields": ["text"], "description": "..."}

``template`` is a ``str.format`` template over ``fields``. With one field the user's text fills
it; with several the user's text must be a JSON object with those keys. ``template`` null
(chat and raw-text tasks) means nothing to apply: chat requests use the base's chat template.

    >>> fmt = {"format_version": 1, "task": "t", "kind": "classification", "template": "Query: {text}\\nIntent:", "fields": ["text"]}
    >>> render_prompt(check_prompt_format(fmt), [{"role": "user", "content": " I lost my card "}])
    'Query: I lost my card\\nIntent:'
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Optional

PROMPT_FILE = "lorafleet_prompt.json"
FORMAT_VERSION = 1
_KEYS = {"format_version", "task", "kind", "template", "fields", "description"}


def write_prompt_format(folder: str | Path, fmt: dict) -> Path:
    """Write ``fmt`` (checked) as the adapter folder's prompt file."""
    path = Path(folder) / PROMPT_FILE
    path.write_text(json.dumps(check_prompt_format(fmt), indent=2))
    return path


def read_prompt_format(folder: str | Path) -> Optional[dict]:
    """The checked prompt format of an adapter folder; None when it has no prompt file; ``ValueError`` if malformed."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{PROMPT_FILE} is not readable JSON: {exc}") from None
    return check_prompt_format(fmt)


def check_prompt_format(fmt: Any) -> dict:
    """``fmt`` if it is a well-formed prompt format, else ``ValueError`` saying what is wrong."""
    if not isinstance(fmt, dict):
        raise ValueError(f"{PROMPT_FILE} must hold a JSON object, got {type(fmt).__name__}")
    unknown = set(fmt) - _KEYS
    if unknown:
        raise ValueError(f"{PROMPT_FILE} has unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    if fmt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{PROMPT_FILE}: format_version must be {FORMAT_VERSION}, got {fmt.get('format_version')!r}")
    for key in ("task", "kind"):
        if not isinstance(fmt.get(key), str) or not fmt[key]:
            raise ValueError(f"{PROMPT_FILE}: {key!r} must be a non-empty string, got {fmt.get(key)!r}")
    template, fields = fmt.get("template"), fmt.get("fields", [])
    if not isinstance(fmt.get("description", ""), str):
        raise ValueError(f"{PROMPT_FILE}: 'description' must be a string")
    if template is None:
        if fields:
            raise ValueError(f"{PROMPT_FILE}: 'fields' must be empty when 'template' is null")
        return fmt
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{PROMPT_FILE}: 'template' must be a non-empty string or null, got {template!r}")
    try:
        used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{PROMPT_FILE}: 'template' is not a valid format string: {exc}") from None
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f.isidentifier() for f in fields):
        raise ValueError(f"{PROMPT_FILE}: 'fields' must be a non-empty list of field names, got {fields!r}")
    if sorted(set(used)) != sorted(fields) or len(set(fields)) != len(fields):
        raise ValueError(f"{PROMPT_FILE}: 'template' uses the fields {sorted(set(used))}, but 'fields' lists {fields}")
    return fmt


def render_prompt(fmt: dict, messages: list[dict]) -> str:
    """The training prompt for a conversation: the last user message through the template; ``ValueError`` if unusable."""
    text = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), None)
    if text is None or not text.strip():
        raise ValueError("this adapter answers the text of the last user message, and the conversation has none")
    fields = fmt["fields"]
    if len(fields) == 1:
        return fmt["template"].format(**{fields[0]: text.strip()})
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, dict) or any(not isinstance(values.get(f), str) or not values[f].strip() for f in fields):
        raise ValueError(f"this adapter's prompt has the fields {fields}: send the user message as a JSON object "
                         f"with a non-empty string for each")
    return fmt["template"].format(**{f: values[f].strip() for f in fields})


def _text(content: Any) -> Optional[str]:
    """A message's text: a string, or the text parts of an OpenAI content list joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return None
