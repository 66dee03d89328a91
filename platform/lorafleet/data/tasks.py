"""The task catalogue: one :class:`TaskSpec` per task holds its columns, prompt template,
label set, metrics and generation budget. Training, evaluation and the demo all read it.

Prompts are short and plain because the base model is tiny::

    >>> spec = get_task("banking77")
    >>> spec.format_prompt({"text": "Where is my card?"})
    'Query: Where is my card?\\nIntent:'
    >>> spec.format_completion({"category": "card_arrival"})   # falls back to the CSV column
    ' card arrival'

``format_*`` read a row by logical field name (``text``, ``label``...) and fall back to the
task's ``default_columns`` (e.g. banking77's CSV column ``category``). A row whose content
cannot be formatted (empty field, malformed choices, no assistant turn) raises
:class:`BadRow`, a ``ValueError`` whose ``reason`` the loader counts.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lorafleet.data.formats import conversation_segments, to_messages
from lorafleet.data.rows import ASSISTANT_MARKER, HUMAN_MARKER, BadRow, is_empty

TaskKind = Literal["classification", "mcqa", "summarization", "chat", "raw_text"]
TASK_KINDS: tuple[str, ...] = ("classification", "mcqa", "summarization", "chat", "raw_text")

CHOICE_LETTERS = ("A", "B", "C", "D", "E")

# The 77 banking77 intents in plain sorted() order, which is the order of the hub
# dataset's ClassLabel (PolyAI/banking77: label 0 is "Refund_not_showing_up").
BANKING77_LABELS: tuple[str, ...] = (
    "Refund_not_showing_up", "activate_my_card", "age_limit", "apple_pay_or_google_pay", "atm_support",
    "automatic_top_up", "balance_not_updated_after_bank_transfer", "balance_not_updated_after_cheque_or_cash_deposit",
    "beneficiary_not_allowed", "cancel_transfer", "card_about_to_expire", "card_acceptance", "card_arrival",
    "card_delivery_estimate", "card_linking", "card_not_working", "card_payment_fee_charged",
    "card_payment_not_recognised", "card_payment_wrong_exchange_rate", "card_swallowed", "cash_withdrawal_charge",
    "cash_withdrawal_not_recognised", "change_pin", "compromised_card", "contactless_not_working", "country_support",
    "declined_card_payment", "declined_cash_withdrawal", "declined_transfer", "direct_debit_payment_not_recognised",
    "disposable_card_limits", "edit_personal_details", "exchange_charge", "exchange_rate", "exchange_via_app",
    "extra_charge_on_statement", "failed_transfer", "fiat_currency_support", "get_disposable_virtual_card",
    "get_physical_card", "getting_spare_card", "getting_virtual_card", "lost_or_stolen_card", "lost_or_stolen_phone",
    "order_physical_card", "passcode_forgotten", "pending_card_payment", "pending_cash_withdrawal", "pending_top_up",
    "pending_transfer", "pin_blocked", "receiving_money", "request_refund", "reverted_card_payment?",
    "supported_cards_and_currencies", "terminate_account", "top_up_by_bank_transfer_charge", "top_up_by_card_charge",
    "top_up_by_cash_or_cheque", "top_up_failed", "top_up_limits", "top_up_reverted", "topping_up_by_card",
    "transaction_charged_twice", "transfer_fee_charged", "transfer_into_account", "transfer_not_received_by_recipient",
    "transfer_timing", "unable_to_verify_identity", "verify_my_identity", "verify_source_of_funds", "verify_top_up",
    "virtual_card_not_working", "visa_or_mastercard", "why_verify_identity", "wrong_amount_of_cash_received",
    "wrong_exchange_rate_for_cash_withdrawal",
)


_is_empty = is_empty


def verbalize_label(label: str) -> str:
    """The words a model is trained to generate for a label: ``card_arrival`` -> ``card arrival``.

    Label names written as identifiers tokenise into pieces a base model has rarely seen;
    their words are what it already models, so adapters learn them far faster (measured on
    banking77 with the tiny base: completion loss 7.5 -> 4.5 at the first logged step).
    Metrics compare answers after :func:`lorafleet.data.metrics.normalize_answer`, which
    maps both spellings to the same string, so references keep the original names.
    """
    return label.replace("_", " ")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the catalogue. See the module docstring for how rows are read."""

    name: str
    kind: TaskKind
    description: str
    hub_name: Optional[str]
    hub_config: Optional[str]
    fields: tuple[str, ...]
    default_columns: dict[str, str] = field(hash=False)
    metrics: tuple[str, ...]
    max_new_tokens: int
    labels: Optional[tuple[str, ...]] = None
    template: str = ""  # str.format template of the prompt (classification, mcqa, summarization)

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
        if _is_empty(value):
            raise BadRow("empty_field", f"field {name!r} is empty (got {value!r})")
        return str(value).strip()

    def label(self, row: dict) -> str:
        """The label as a name. An integer label (or a digit string that is not itself a label, as in a
        CSV exported from the hub) is an index into ``self.labels`` when the task has them."""
        value = self.value(row, "label")
        if isinstance(value, str) and value.strip().isdigit() and self.labels and value.strip() not in self.labels:
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and self.labels:
            if not 0 <= value < len(self.labels):
                raise BadRow("unknown_label", f"label index {value} is outside 0..{len(self.labels) - 1}")
            return self.labels[value]
        return self.text(row, "label")

    # -- what a row becomes: prompt, completion, input, reference ----------------------------
    def format_prompt(self, row: dict, tokenizer: Any = None) -> str:
        """The model input. ``tokenizer`` is used by ``chat`` only (its chat template, if any)."""
        if self.kind == "classification":
            return self.template.format(text=self.text(row, "text"))
        if self.kind == "mcqa":
            choices = "\n".join(f"{letter}. {text}" for letter, text in self.choices(row))
            return self.template.format(question=self.text(row, "question"), choices=choices)
        if self.kind == "summarization":
            return self.template.format(**{self.fields[0]: self.text(row, self.fields[0])})
        if self.kind == "chat":
            return _chat_parts(self, row, tokenizer)[0]
        return ""  # raw_text: the whole text is the completion

    def format_completion(self, row: dict, tokenizer: Any = None) -> str:
        """The target text, without eos (tokenisation appends it). ``tokenizer``: as in :meth:`format_prompt`
        (a chat reply follows a chat template's generation prompt with no leading space)."""
        if self.kind == "classification":
            return " " + verbalize_label(self.label(row))
        if self.kind == "mcqa":
            return " " + self.answer(row)
        if self.kind == "summarization":
            return " " + self.text(row, self.fields[1])
        if self.kind == "chat":
            return _chat_parts(self, row, tokenizer)[1]
        return self.text(row, "text")

    def format_input(self, row: dict) -> str:
        """The raw input as shown in predictions files (query, question with choices, dialogue...)."""
        if self.kind == "classification":
            return self.text(row, "text")
        if self.kind == "mcqa":
            choices = " | ".join(f"{letter}. {text}" for letter, text in self.choices(row))
            return f"{self.text(row, 'question')} ({choices})"
        if self.kind == "summarization":
            return self.text(row, self.fields[0])
        if self.kind == "chat":
            return _chat_parts(self, row, None)[2]
        return self.text(row, "text")

    def format_reference(self, row: dict) -> str:
        """The reference answer as a metric compares it (label name, letter, summary, reply)."""
        if self.kind == "classification":
            return self.label(row)
        return self.format_completion(row).strip()

    def format_example(self, row: dict, tokenizer: Any = None) -> tuple[str, str, str, str]:
        """``(prompt, completion, input, reference)`` of one row; :class:`BadRow` if it cannot be formatted."""
        if self.kind == "chat":  # parse the conversation once
            prompt, completion, shown = _chat_parts(self, row, tokenizer)
            return prompt, completion, shown, completion.strip()
        completion = self.format_completion(row)
        reference = self.label(row) if self.kind == "classification" else completion.strip()
        return self.format_prompt(row, tokenizer), completion, self.format_input(row), reference

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


# -- chat ------------------------------------------------------------------------------
def _chat_parts(spec: TaskSpec, row: dict, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, completion, input) of a chat row's last trained assistant turn: a ``messages`` list
    (OpenAI or ShareGPT items) or guanaco ``### Human/### Assistant`` text."""
    value = spec.value(row, "messages")
    conversation = to_messages("openai", {"messages": value if value is not None else row.get("text")})
    return conversation_segments(conversation, tokenizer, "all_assistant_turns")[:3]


# -- the catalogue -----------------------------------------------------------------------
_CATALOGUE: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="classification", kind="classification",
            description="Generic text classification (e.g. claim / not-a-claim); labels come from the data or data.labels.",
            hub_name=None, hub_config=None, fields=("text", "label"), default_columns={},
            metrics=("accuracy", "macro_f1"), max_new_tokens=16, template="Text: {text}\nLabel:",
        ),
        TaskSpec(
            name="banking77", kind="classification",
            description="Banking customer-query intent detection, 77 intents (PolyAI/banking77; local CSV text,category).",
            hub_name="PolyAI/banking77", hub_config=None, fields=("text", "label"), default_columns={"label": "category"},
            metrics=("accuracy", "macro_f1"), max_new_tokens=24, labels=BANKING77_LABELS, template="Query: {text}\nIntent:",
        ),
        TaskSpec(
            name="commonsense_qa", kind="mcqa",
            description="Five-way multiple-choice commonsense questions; the answer is a letter A-E (tau/commonsense_qa).",
            hub_name="tau/commonsense_qa", hub_config=None, fields=("question", "choices", "answer"),
            default_columns={"answer": "answerKey"}, metrics=("exact_match",), max_new_tokens=4,
            template="Question: {question}\n{choices}\nAnswer:",
        ),
        TaskSpec(
            name="dialogsum", kind="summarization",
            description="Summarise a two-person dialogue in a sentence or two (knkarthick/dialogsum).",
            hub_name="knkarthick/dialogsum", hub_config=None, fields=("dialogue", "summary"), default_columns={},
            metrics=("rouge_l",), max_new_tokens=128, template="Dialogue:\n{dialogue}\nSummary:",
        ),
        TaskSpec(
            name="chat", kind="chat",
            description="Instruction/chat tuning: a `messages` column (chat template) or guanaco-style `text` "
                        "(### Human: ... ### Assistant: ...); loss on the last assistant turn (timdettmers/openassistant-guanaco).",
            hub_name="timdettmers/openassistant-guanaco", hub_config=None, fields=("messages",),
            default_columns={"messages": "text"}, metrics=(), max_new_tokens=256,
        ),
        TaskSpec(
            name="raw_text", kind="raw_text",
            description="Self-supervised language modelling on a `text` column or plain .txt lines (no masking).",
            hub_name=None, hub_config=None, fields=("text",), default_columns={}, metrics=(), max_new_tokens=64,
        ),
    )
}


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
