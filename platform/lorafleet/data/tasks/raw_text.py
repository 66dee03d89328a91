"""Raw text: self-supervised language modelling on whole texts (no prompt, loss on every token, packable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafleet.data.tasks.base import TaskSpec, register_kind, register_task


@register_kind
@dataclass(frozen=True)
class RawTextTask(TaskSpec):
    kind: ClassVar[str] = "raw_text"
    trains_whole_text: ClassVar[bool] = True

    def format_prompt(self, row: dict, tokenizer: Any = None) -> str:
        return ""

    def format_completion(self, row: dict, tokenizer: Any = None) -> str:
        return self.text(row, "text")


register_task(RawTextTask(
    name="raw_text",
    description="Self-supervised language modelling on a `text` column or plain .txt lines (no masking).",
    hub_name=None, hub_config=None, fields=("text",), default_columns={}, metrics=(), max_new_tokens=64,
))
