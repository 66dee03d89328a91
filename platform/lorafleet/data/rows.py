"""What every task reads rows with and makes of them: :class:`BadRow` (a row that cannot become an
example, counted by its ``reason``), the emptiness test, the guanaco chat markers, and :class:`Example`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

ASSISTANT_MARKER = "### Assistant:"
HUMAN_MARKER = "### Human:"


class BadRow(ValueError):
    """A row that cannot become an example. ``reason`` is a short tag counted as ``skipped_<reason>``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass
class Example:
    """One prompt/completion pair plus what a predictions file and a metric need."""

    prompt: str
    completion: str
    input: str
    reference: str
    # A conversation: its text pieces up to the reply above, each marked trained or not (None: prompt + completion).
    segments: Optional[tuple[tuple[str, bool], ...]] = None
    # Whether bos goes before the prompt. False for a conversation rendered by the tokenizer's chat template:
    # the template owns its special tokens, as in `apply_chat_template(tokenize=True)`, vLLM's chat API and TRL.
    bos: bool = True
