"""The task catalogue: one task type per kind (:mod:`.base` explains the pattern), each owning its
prompt, completion, reference, answer cleaning and metrics, and the named tasks of each kind.

    >>> spec = get_task("banking77")
    >>> spec.format_prompt({"text": "Where is my card?"})
    'Query: Where is my card?\\nIntent:'

A new kind is one module here: a :class:`TaskSpec` subclass under :func:`register_kind` and its
tasks given to :func:`register_task`, imported below (the import order is the catalogue order).
"""

from typing import Literal

from lorafleet.data.rows import ASSISTANT_MARKER, HUMAN_MARKER, BadRow
from lorafleet.data.tasks.base import KINDS, ReadContext, TaskSpec, get_task, list_tasks, register_kind, register_task, task_kind
from lorafleet.data.tasks.classification import BANKING77_LABELS, ClassificationTask, verbalize_label
from lorafleet.data.tasks.mcqa import CHOICE_LETTERS, MultipleChoiceTask
from lorafleet.data.tasks.summarization import SummarizationTask
from lorafleet.data.tasks.chat import ChatTask  # noqa: E402 (catalogue order)
from lorafleet.data.tasks.raw_text import RawTextTask
from lorafleet.data.tasks.custom import GenerationTask, custom_task, resolve_task

TaskKind = Literal["classification", "mcqa", "summarization", "chat", "raw_text", "generation"]
TASK_KINDS: tuple[str, ...] = tuple(KINDS)

__all__ = [
    "ASSISTANT_MARKER", "BANKING77_LABELS", "CHOICE_LETTERS", "HUMAN_MARKER", "KINDS", "TASK_KINDS", "BadRow",
    "ChatTask", "ClassificationTask", "GenerationTask", "MultipleChoiceTask", "RawTextTask", "ReadContext", "SummarizationTask",
    "TaskKind", "TaskSpec", "custom_task", "get_task", "list_tasks", "register_kind", "register_task", "resolve_task", "task_kind", "verbalize_label",
]
