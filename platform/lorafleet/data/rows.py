"""What every task reads rows with: :class:`BadRow` (a row that cannot become an example, counted by
its ``reason``), the emptiness test, and the guanaco chat markers."""

from __future__ import annotations

from typing import Any

ASSISTANT_MARKER = "### Assistant:"
HUMAN_MARKER = "### Human:"


class BadRow(ValueError):
    """A row that cannot become an example. ``reason`` is a short tag counted as ``skipped_<reason>``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
