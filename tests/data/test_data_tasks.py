"""The task catalogue: lookups, the unknown-task error, and each task's prompt/completion format."""

from __future__ import annotations

import json

import pytest

from lorafleet.data import BadRow, get_task, list_tasks

CATALOGUE = ["classification", "banking77", "commonsense_qa", "dialogsum", "chat", "raw_text"]


def test_catalogue_lists_every_task_by_name():
    assert [t.name for t in list_tasks()] == CATALOGUE
    for name in CATALOGUE:
        spec = get_task(name)
        assert spec.name == name and spec.description and spec.max_new_tokens > 0
    assert get_task("banking77").hub_name == "PolyAI/banking77"
    assert get_task("commonsense_qa").hub_name == "tau/commonsense_qa"
    assert get_task("dialogsum").hub_name == "knkarthick/dialogsum"
    assert get_task("chat").hub_name == "timdettmers/openassistant-guanaco"
    assert get_task("banking77").metrics == ("accuracy", "macro_f1")
    assert get_task("commonsense_qa").metrics == ("exact_match",)
    assert get_task("dialogsum").metrics == ("rouge_l",)
    assert get_task("chat").metrics == () and get_task("raw_text").metrics == ()
    hash(get_task("banking77"))  # usable as a dict key / cache key


def test_unknown_task_error_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_task("banking78")
    message = str(err.value)
    assert "'banking78'" in message and "Did you mean 'banking77'" in message
    for name in CATALOGUE:
        assert name in message


def test_banking77_labels_are_the_hub_classlabel_order():
    labels = get_task("banking77").labels
    assert len(labels) == 77 and list(labels) == sorted(labels)
    assert labels[0] == "Refund_not_showing_up" and labels[43] == "lost_or_stolen_phone"


def test_classification_formats():
    spec = get_task("banking77")
    row = {"text": "  Where is my card? ", "category": "card_arrival"}
    assert spec.format_prompt(row) == "Query: Where is my card?\nIntent:"
    assert spec.format_completion(row) == " card arrival"
    assert spec.format_completion({"text": "x", "label": 12}) == " card arrival"  # hub int label
    assert spec.format_completion({"text": "x", "label": "12"}) == " card arrival"  # ... exported to CSV
    generic = get_task("classification")
    assert generic.format_prompt({"text": "The earth is flat."}) == "Text: The earth is flat.\nLabel:"
    assert generic.format_completion({"label": "claim"}) == " claim"
    with pytest.raises(BadRow) as err:
        generic.format_prompt({"text": "   "})
    assert err.value.reason == "empty_field"


def test_commonsense_qa_formats_hub_rows_flat_columns_and_json_choices():
    spec = get_task("commonsense_qa")
    hub_row = {"question": "Where do you keep milk?",
               "choices": {"label": ["A", "B", "C"], "text": ["fridge", "oven", "garden"]}, "answerKey": "A"}
    assert spec.format_prompt(hub_row) == "Question: Where do you keep milk?\nA. fridge\nB. oven\nC. garden\nAnswer:"
    assert spec.format_completion(hub_row) == " A"
    flat = {"question": "Where do you keep milk?", "A": "fridge", "B": "oven", "C": "garden", "answer": "b"}
    assert spec.format_prompt(flat) == spec.format_prompt(hub_row)
    assert spec.format_completion(flat) == " B"
    as_json = dict(hub_row, choices=json.dumps(hub_row["choices"]))
    assert spec.format_prompt(as_json) == spec.format_prompt(hub_row)
    with pytest.raises(BadRow) as err:
        spec.format_completion(dict(hub_row, answerKey="E"))
    assert err.value.reason == "bad_answer"
    with pytest.raises(BadRow) as err:
        spec.format_prompt(dict(hub_row, choices="not json"))
    assert err.value.reason == "bad_choices"


def test_dialogsum_and_raw_text_formats():
    spec = get_task("dialogsum")
    row = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}
    assert spec.format_prompt(row) == "Dialogue:\n#Person1#: Hi.\n#Person2#: Hello.\nSummary:"
    assert spec.format_completion(row) == " They greet."
    raw = get_task("raw_text")
    assert raw.format_prompt({"text": "some words"}) == "" and raw.format_completion({"text": "some words"}) == "some words"


def test_chat_guanaco_text_splits_at_last_assistant_turn():
    spec = get_task("chat")
    text = "### Human: Hi there.### Assistant: Hello!### Human: What is 2+2?### Assistant: It is 4."
    assert spec.format_prompt({"text": text}) == "### Human: Hi there.### Assistant: Hello!### Human: What is 2+2?### Assistant:"
    assert spec.format_completion({"text": text}) == " It is 4."
    assert spec.format_example({"text": text})[2] == "What is 2+2?"
    with pytest.raises(BadRow) as err:
        spec.format_prompt({"text": "### Human: nobody answers"})
    assert err.value.reason == "no_assistant_turn"


def test_chat_messages_with_and_without_chat_template(chat_tokenizer):
    spec = get_task("chat")
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    prompt = spec.format_prompt(row, chat_tokenizer)
    assert prompt == chat_tokenizer.apply_chat_template(row["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\n2+2?</s>\n<|assistant|>\n")
    assert spec.format_completion(row, chat_tokenizer) == "4"
    # No chat template: the plain guanaco-style layout.
    assert spec.format_prompt(row) == "### System: Be brief.\n### Human: Hi\n### Assistant: Hello.\n### Human: 2+2?\n### Assistant:"
    assert spec.format_completion(row) == " 4"


def test_a_new_kind_is_one_class_and_runs_through_loading_and_metrics(tmp_path):
    """Tasks are types: a subclass registered for its kind is read, formatted and scored with no other change."""
    from dataclasses import dataclass
    from typing import ClassVar

    from lorafleet.data import TaskSpec, compute_metrics, load_eval_examples, register_kind, tokenize_examples
    from lorafleet.data.tasks import KINDS

    @register_kind
    @dataclass(frozen=True)
    class Reverse(TaskSpec):
        kind: ClassVar[str] = "reverse_test"

        def format_completion(self, row, tokenizer=None):
            return " " + self.text(row, "word")[::-1]

        @classmethod
        def normalize(cls, text):
            return (text or "").strip().lower()

    try:
        spec = Reverse(name="reverse", description="Reverse a word.", hub_name=None, hub_config=None,
                       fields=("word",), default_columns={}, metrics=("exact_match",), max_new_tokens=8,
                       template="Word: {word}\nReversed:")
        path = tmp_path / "words.jsonl"
        path.write_text('{"word": "card"}\n{"word": " "}\n{"word": "top"}\n', encoding="utf-8")
        examples = load_eval_examples(spec, str(path))
        assert [(e.prompt, e.completion, e.reference) for e in examples] == [
            ("Word: card\nReversed:", " drac", "drac"), ("Word: top\nReversed:", " pot", "pot")]
        assert compute_metrics(spec, ["DRAC", "top"], ["drac", "pot"]) == {"exact_match": 0.5}
        with pytest.raises(ValueError, match="already registered"):
            register_kind(Reverse)
    finally:
        KINDS.pop("reverse_test", None)
