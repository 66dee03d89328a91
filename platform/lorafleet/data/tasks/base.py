"""The task type every kind of task derives from, and the two registries: kinds (one class each)
and the catalogue (named instances).

A kind is one class owning what differs between kinds: how a row becomes a prompt, a
completion, an input and a reference; how a generated answer is cleaned and normalised; which
metrics score it; how its labels are trained (completion only, or every token). Adding a kind is
one file: a subclass decorated with :func:`register_kind`, and its catalogue entries given to
:func:`register_task`.

Rows are read by logical field name (``text``, ``label``...) with a fallback to the task's
``default_columns`` (e.g. banking77's CSV column ``category``). A row whose content cannot be
formatted raises :class:`BadRow`, a ``ValueError`` whose ``reason`` the loader counts.
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from lorafleet.data.metrics import score
from lorafleet.data.rows import BadRow, Example, is_empty


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template uses, in order: ``"Query: {text}"`` -> ``["text"]``."""
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


@dataclass
class ReadContext:
    """What the loader knows beyond a row: the chat format and turns to train, the closed label set
    and the class names of an integer label column (hub ClassLabel)."""

    fmt: str = "auto"
    loss_on: str = "all_assistant_turns"
    closed: Optional[set[str]] = None
    index_names: Optional[list[str]] = None


@dataclass(frozen=True)
class TaskSpec:
    """One task of the catalogue; subclasses (one per kind) hold the behaviour."""

    name: str
    description: str
    hub_name: Optional[str]
    hub_config: Optional[str]
    fields: tuple[str, ...]
    default_columns: dict[str, str] = field(hash=False)
    metrics: tuple[str, ...]
    max_new_tokens: int
    labels: Optional[tuple[str, ...]] = None
    template: str = ""  # str.format template of the prompt, over the task's fields

    kind: ClassVar[str] = ""
    takes_labels: ClassVar[bool] = False  # data.labels (a closed label set) applies
    trains_whole_text: ClassVar[bool] = False  # labels == input_ids (no prompt), packing allowed

    # -- reading a row -------------------------------------------------------------------
    def value(self, row: dict, name: str) -> Any:
        """The value of logical field ``name``: the column of that name, else the default column."""
        if name in row:
            return row[name]
        fallback = self.default_columns.get(name)
        return row.get(fallback) if fallback else None

    def text(self, row: dict, name: str) -> str:
        """Field ``name`` as stripped text; :class:`BadRow` (``empty_field``) when missing or blank."""
        value = self.value(row, name)
        if is_empty(value):
            raise BadRow("empty_field", f"field {name!r} is empty (got {value!r})")
        return str(value).strip()

    # -- what a row becomes (overridden per kind) ----------------------------------------
    def format_prompt(self, row: dict, tokenizer: Any = None) -> str:
        """The model input: the template over the fields it names. ``tokenizer``: chat only (its chat template)."""
        return self.template.format(**{name: self.text(row, name) for name in template_fields(self.template)})

    def format_completion(self, row: dict, tokenizer: Any = None) -> str:
        """The target text, without eos (tokenisation appends it)."""
        return " " + self.text(row, self.fields[-1])

    def format_input(self, row: dict) -> str:
        """The raw input as shown in predictions files (query, question with choices, dialogue...)."""
        return self.text(row, self.fields[0])

    def format_reference(self, row: dict) -> str:
        """The reference answer as a metric compares it."""
        return self.format_completion(row).strip()

    def format_example(self, row: dict, tokenizer: Any = None) -> tuple[str, str, str, str]:
        """``(prompt, completion, input, reference)`` of one row; :class:`BadRow` if it cannot be formatted."""
        return self.format_prompt(row, tokenizer), self.format_completion(row), self.format_input(row), self.format_reference(row)

    def prompt_format(self) -> dict:
        """How a served request becomes this task's prompt (saved with the adapter: :mod:`lorafleet.data.prompt_format`).
        No template (chat, raw text): nothing to apply, chat requests use the base's chat template."""
        fields = template_fields(self.template) if self.template else []
        return {"format_version": 1, "task": self.name, "kind": self.kind, "template": self.template or None, "fields": fields,
                "description": (f"the user's text fills {{{fields[0]}}}" if len(fields) == 1 else
                                f"the user's message is a JSON object with the keys {fields}") if fields else
                               f"no prompt template ({self.kind}): chat requests use the base's chat template"}

    # -- what the loader asks ---------------------------------------------------------------
    def resolve_format(self, found: list[str], columns: dict[str, str], fmt: str) -> str:
        """The data format of a file with columns ``found`` (chat tells its formats apart; others have one)."""
        return fmt

    def column_fields(self, found: list[str], columns: dict[str, str], fmt: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str], str]:
        """(required fields, optional fields, default columns, who reads them) for a file with columns ``found``."""
        return self.fields, (), self.default_columns, f"task {self.name!r}"

    def field_optional(self, name: str, found: list[str]) -> bool:
        """Whether a required field may lack its column in a file with columns ``found`` (another layout holds it)."""
        return False

    def closed_labels(self, labels: Optional[list[str]]) -> Optional[set[str]]:
        """The closed label set rows are checked against (None: any)."""
        return None

    def make_example(self, row: dict, tokenizer: Any, ctx: ReadContext) -> Example:
        """The example of a row whose fields carry their logical names; :class:`BadRow` if unusable."""
        return Example(*self.format_example(row, tokenizer))

    def label_names(self, closed: Optional[set[str]], train: list[Example]) -> Optional[list[str]]:
        """The labels a run reports (classification: the closed set or those seen in training)."""
        return None

    # -- what generation and metrics ask ------------------------------------------------------
    @classmethod
    def clean_prediction(cls, text: str) -> str:
        """A generated answer as stored in predictions: stripped."""
        return text.strip()

    @classmethod
    def normalize(cls, text: str) -> str:
        """What an answer is compared as."""
        return (text or "").strip()

    @property
    def generation_metrics(self) -> bool:
        """Whether generating on validation rows gives metrics (chat and raw text have loss only)."""
        return bool(self.metrics)

    def compute_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Each of ``self.metrics`` on the normalised predictions and references."""
        if not self.metrics:
            return {}
        if not references:
            raise ValueError(f"no predictions to score for task {self.name!r}; the evaluation set is empty")
        preds = [self.normalize(p) for p in predictions]
        refs = [self.normalize(r) for r in references]
        return {name: score(name, preds, refs) for name in self.metrics}


# -- registries --------------------------------------------------------------------------
KINDS: dict[str, type[TaskSpec]] = {}
_CATALOGUE: dict[str, TaskSpec] = {}


def register_kind(cls: type[TaskSpec]) -> type[TaskSpec]:
    """Class decorator: make ``cls`` the type of tasks of kind ``cls.kind``."""
    if not cls.kind or cls.kind in KINDS:
        raise ValueError(f"task kind {cls.kind!r} of {cls.__name__} is empty or already registered")
    KINDS[cls.kind] = cls
    return cls


def register_task(*specs: TaskSpec) -> None:
    """Add tasks to the catalogue (in order)."""
    for spec in specs:
        if spec.name in _CATALOGUE:
            raise ValueError(f"task {spec.name!r} is already in the catalogue")
        _CATALOGUE[spec.name] = spec


def task_kind(kind: Any) -> type[TaskSpec]:
    """The class of a kind given by name, task or class; ``ValueError`` listing the kinds."""
    if isinstance(kind, TaskSpec) or (isinstance(kind, type) and issubclass(kind, TaskSpec)):
        return type(kind) if isinstance(kind, TaskSpec) else kind
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    return cls


def list_tasks() -> list[TaskSpec]:
    """Every task of the catalogue, in catalogue order."""
    return list(_CATALOGUE.values())


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; ``ValueError`` listing the known names when there is none."""
    spec = _CATALOGUE.get(name)
    if spec is None:
        close = difflib.get_close_matches(str(name), list(_CATALOGUE), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_CATALOGUE)}.{hint} Set data.task to one of them.")
    return spec
