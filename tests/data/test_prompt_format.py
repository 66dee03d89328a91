"""The prompt format an adapter carries to serving: derived from the task, and rendered from a chat
conversation into exactly the prompt the task trains on."""

from __future__ import annotations

import json

import pytest

from lorafleet.config import DataConfig
from lorafleet.data.prompt_format import check_prompt_format, read_prompt_format, render_prompt, write_prompt_format
from lorafleet.data.tasks import get_task, list_tasks, resolve_task


def user(text):
    return {"role": "user", "content": text}


@pytest.mark.parametrize("task, row, text", [
    ("banking77", {"text": "I lost my card"}, "I lost my card"),
    ("dialogsum", {"dialogue": "#Person1#: Hi.\n#Person2#: Hello."}, "#Person1#: Hi.\n#Person2#: Hello."),
    ("commonsense_qa", {"question": "Where are fish?", "choices": ["sea", "sky"], "answer": "A"}, "Where are fish?\nA. sea\nB. sky"),
])
def test_the_users_text_renders_to_the_training_prompt(task, row, text):
    spec = get_task(task)
    fmt = check_prompt_format(spec.prompt_format())
    assert (fmt["task"], fmt["kind"]) == (task, spec.kind)
    assert render_prompt(fmt, [user(f"  {text} ")]) == spec.format_prompt(row)


def test_the_last_user_turn_is_rendered_and_text_parts_are_joined():
    fmt = get_task("banking77").prompt_format()
    conversation = [{"role": "system", "content": "be brief"}, user("first question"), {"role": "assistant", "content": "x"},
                    {"role": "user", "content": [{"type": "text", "text": "where is"}, {"type": "text", "text": "my card?"}]},
                    {"role": "assistant", "content": "partial"}]
    assert render_prompt(fmt, conversation) == "Query: where is\nmy card?\nIntent:"
    with pytest.raises(ValueError, match="last user message"):
        render_prompt(fmt, [{"role": "system", "content": "no user here"}])


def test_chat_and_raw_text_tasks_have_nothing_to_apply():
    for spec in list_tasks():
        fmt = check_prompt_format(spec.prompt_format())
        assert (fmt["template"] is None) == (spec.kind in ("chat", "raw_text")), spec.name


def test_a_custom_task_carries_its_template_and_several_fields_take_json(tmp_path):
    spec = resolve_task(DataConfig(custom_task={"prompt_template": "Q: {question}\nContext: {context}\nA:",
                                                "completion_column": "answer", "metric": "exact_match"}))
    write_prompt_format(tmp_path, spec.prompt_format())
    fmt = read_prompt_format(tmp_path)
    assert fmt["fields"] == ["question", "context"]
    row = {"question": "2+2?", "context": "arithmetic"}
    assert render_prompt(fmt, [user(json.dumps(row))]) == spec.format_prompt(row)
    with pytest.raises(ValueError, match="JSON object"):
        render_prompt(fmt, [user("2+2?")])
    assert read_prompt_format(tmp_path / "elsewhere") is None
