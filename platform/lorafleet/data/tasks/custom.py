"""Tasks defined in the YAML (``data.custom_task``), without code: a prompt template over the data's
columns and either a label column (a :class:`ClassificationTask`) or a completion column (a
:class:`GenerationTask`), scored with metrics chosen by name.

    >>> from lorafleet.config import DataConfig
    >>> spec = resolve_task(DataConfig(custom_task={"prompt_template": "Q: {question}\\nA:", "completion_column": "answer",
    ...                                             "metric": "exact_match"}))
    >>> spec.format_example({"question": "2+2?", "answer": "4"})
    ('Q: 2+2?\\nA:', ' 4', '2+2?', '4')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafleet.data.tasks.base import TaskSpec, get_task, register_kind, template_fields
from lorafleet.data.tasks.classification import ClassificationTask


@register_kind
@dataclass(frozen=True)
class GenerationTask(TaskSpec):
    """Free text in, free text out: the template over the columns it names, the completion its last field."""

    kind: ClassVar[str] = "generation"


def custom_task(cfg: Any) -> TaskSpec:
    """The task a ``CustomTaskConfig`` describes."""
    names = tuple(template_fields(cfg.prompt_template))
    common = dict(name=cfg.name, description=f"custom task ({cfg.prompt_template!r})", hub_name=None, hub_config=None,
                  metrics=cfg.metric_names(), template=cfg.prompt_template)
    if cfg.label_column is not None:
        return ClassificationTask(fields=(*names, "label"), default_columns={"label": cfg.label_column},
                                  labels=tuple(cfg.labels) if cfg.labels else None,
                                  max_new_tokens=cfg.max_new_tokens or 16, **common)
    return GenerationTask(fields=(*names, cfg.completion_column), default_columns={},
                          max_new_tokens=cfg.max_new_tokens or 128, **common)


def resolve_task(data: Any) -> TaskSpec:
    """The task of a ``DataConfig``: its ``custom_task`` when given, else ``task`` from the catalogue."""
    return custom_task(data.custom_task) if getattr(data, "custom_task", None) is not None else get_task(data.task)
