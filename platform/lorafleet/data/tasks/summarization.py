"""Summarisation (dialogsum): a document in, its summary out. ROUGE-L.

The base class's formatting is this kind's: the prompt is the template over the fields it names,
the completion the last field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafleet.data.tasks.base import TaskSpec, register_kind, register_task


@register_kind
@dataclass(frozen=True)
class SummarizationTask(TaskSpec):
    kind: ClassVar[str] = "summarization"


register_task(SummarizationTask(
    name="dialogsum",
    description="Summarise a two-person dialogue in a sentence or two (knkarthick/dialogsum).",
    hub_name="knkarthick/dialogsum", hub_config=None, fields=("dialogue", "summary"), default_columns={},
    metrics=("rouge_l",), max_new_tokens=128, template="Dialogue:\n{dialogue}\nSummary:",
))
