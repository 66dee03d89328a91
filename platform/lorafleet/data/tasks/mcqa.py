"""Multiple choice (commonsense_qa): a question and lettered choices; the answer is a letter. Exact match."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from lorafleet.data.rows import BadRow, is_empty as _is_empty
from lorafleet.data.tasks.base import TaskSpec, register_kind, register_task

CHOICE_LETTERS = ("A", "B", "C", "D", "E")
_LETTER_WORD = re.compile(r"\b([A-E])\b")
_ANY_LETTER = re.compile(r"([A-E])")


@register_kind
@dataclass(frozen=True)
class MultipleChoiceTask(TaskSpec):
    """Choices come as hub ``{label: [...], text: [...]}`` (or its JSON string), a list, or flat columns A..E."""

    kind: ClassVar[str] = "mcqa"

    def format_prompt(self, row: dict, tokenizer: Any = None) -> str:
        choices = "\n".join(f"{letter}. {text}" for letter, text in self.choices(row))
        return self.template.format(question=self.text(row, "question"), choices=choices)

    def format_completion(self, row: dict, tokenizer: Any = None) -> str:
        return " " + self.answer(row)

    def format_input(self, row: dict) -> str:
        choices = " | ".join(f"{letter}. {text}" for letter, text in self.choices(row))
        return f"{self.text(row, 'question')} ({choices})"

    def prompt_format(self) -> dict:
        """The user's text is the question followed by its choices, one ``A. text`` per line (as trained)."""
        fmt = super().prompt_format()
        if "{question}\n{choices}" in self.template:
            fmt.update(template=self.template.replace("{question}\n{choices}", "{question}"), fields=["question"],
                       description="the user's text is the question, then one 'A. choice' line per choice")
        return fmt

    def field_optional(self, name: str, found: list[str]) -> bool:
        return name == "choices" and all(c in found for c in CHOICE_LETTERS[:2])  # flat columns A..E

    @classmethod
    def clean_prediction(cls, text: str) -> str:
        return text.strip().split("\n", 1)[0].strip()

    @classmethod
    def normalize(cls, text: str) -> str:
        """The first letter A-E of the first line (a standalone letter first, so "Answer: D" gives "D")."""
        first = (text or "").strip().split("\n", 1)[0].strip()
        match = _LETTER_WORD.search(first) or _ANY_LETTER.search(first)
        return match.group(1) if match else ""

    # -- multiple choice -----------------------------------------------------------------
    def choices(self, row: dict) -> list[tuple[str, str]]:
        """``[(letter, text), ...]`` from hub-style ``{label: [...], text: [...]}`` (or its JSON string),
        a list of texts, or flat columns ``A``..``E``."""
        value = self.value(row, "choices")
        if value is None:
            value = {"label": [c for c in CHOICE_LETTERS if not _is_empty(row.get(c))],
                     "text": [row[c] for c in CHOICE_LETTERS if not _is_empty(row.get(c))]}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise BadRow("bad_choices", f"field 'choices' is a string but not JSON: {value[:80]!r}") from None
        if isinstance(value, dict) and "text" in value:
            letters = list(value.get("label") or CHOICE_LETTERS[: len(value["text"])])
            texts = list(value["text"])
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            letters = [v.get("label") for v in value]
            texts = [v.get("text") for v in value]
        elif isinstance(value, list):
            letters, texts = list(CHOICE_LETTERS[: len(value)]), list(value)
        else:
            raise BadRow("bad_choices",
                         f"field 'choices' must be {{label: [...], text: [...]}} or a list, got {type(value).__name__}")
        pairs = list(zip(letters, texts))
        if len(letters) != len(texts) or len(pairs) < 2 or any(_is_empty(x) for pair in pairs for x in pair):
            raise BadRow("bad_choices",
                         f"need at least 2 non-empty choices with one letter each, got labels={letters!r} texts={texts!r}")
        return [(str(letter).strip(), str(text).strip()) for letter, text in pairs]

    def answer(self, row: dict) -> str:
        """The answer letter; an integer answer is an index into the choices."""
        letters = [letter for letter, _ in self.choices(row)]
        value = self.value(row, "answer")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(letters):
            return letters[value]
        letter = self.text(row, "answer").upper()
        if letter not in letters:
            raise BadRow("bad_answer", f"answer {letter!r} is not one of the choice letters {letters}")
        return letter


register_task(MultipleChoiceTask(
    name="commonsense_qa",
    description="Five-way multiple-choice commonsense questions; the answer is a letter A-E (tau/commonsense_qa).",
    hub_name="tau/commonsense_qa", hub_config=None, fields=("question", "choices", "answer"),
    default_columns={"answer": "answerKey"}, metrics=("exact_match",), max_new_tokens=4,
    template="Question: {question}\n{choices}\nAnswer:",
))
