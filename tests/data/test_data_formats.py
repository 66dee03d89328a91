"""Chat data formats (OpenAI messages, ShareGPT, Alpaca, prompt/completion, guanaco text): each is read,
rendered with the chat template (or the plain layout) and masked so that exactly the assistant turns are
trained on. Checked token by token on a real BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.config import DataConfig
from lorafleet.data import load_eval_examples, load_task_data, tokenize_examples

IGNORE = -100
SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _trained(feature: dict, tok) -> list[str]:
    """The decoded runs of labelled tokens, in order."""
    runs, run = [], []
    for t in feature["labels"] + [IGNORE]:
        if t == IGNORE and run:
            runs.append(tok.decode(run))
            run = []
        elif t != IGNORE:
            run.append(t)
    return runs


def _features(tmp_path, rows, tok, max_len=256, **cfg):
    """Every row of a JSONL file as a feature, in file order (one example per row, none held out)."""
    examples = load_eval_examples("chat", _write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer=tok,
                                  fmt=cfg.pop("format", "auto"))
    if cfg.get("loss_on"):
        data = load_task_data(DataConfig(task="chat", path=str(tmp_path / "chat.jsonl"), validation_path=str(tmp_path / "chat.jsonl"), **cfg), tok)
        examples = data.train
    features, stats = tokenize_examples(examples, tok, max_len, "chat")
    return examples, features, stats


def test_openai_messages_train_every_assistant_turn_with_the_template(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    (ex,), (f,), _ = _features(tmp_path, [{"messages": TWO_TURNS}], tok)
    assert _trained(f, tok) == ["Hello.</s>", "4</s>"]
    # The sequence is the template's rendering of the whole conversation, bos once.
    assert tok.decode(f["input_ids"]) == tok.apply_chat_template(TWO_TURNS, tokenize=False).rstrip()
    assert f["input_ids"][:2].count(tok.bos_token_id) == 1
    # What evaluation generates from is exactly the context of the last reply in training.
    last = max(i for i, t in enumerate(f["labels"]) if t == IGNORE) + 1
    assert tok.decode(f["input_ids"][:last]) == ex.prompt == tok.apply_chat_template(TWO_TURNS[:4], tokenize=False,
                                                                                       add_generation_prompt=True)
    assert (ex.completion, ex.reference, ex.input) == ("4", "4", "2+2?")


def test_weight_zero_turns_and_last_turn_only_are_context(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    weighted = [dict(m, weight=0) if m["content"] == "Hello." else m for m in TWO_TURNS]
    _, (f,), _ = _features(tmp_path, [{"messages": weighted}], tok)
    assert _trained(f, tok) == ["4</s>"] and "Hello.</s>" in tok.decode(f["input_ids"])
    # The last trained turn ends the example: a trailing weight-0 reply is dropped.
    tail_zero = TWO_TURNS[:3] + [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 0}]
    (ex,), (f,), _ = _features(tmp_path, [{"messages": tail_zero}], tok)
    assert _trained(f, tok) == ["Hello.</s>"] and "2+2?" not in tok.decode(f["input_ids"]) and ex.reference == "Hello."
    # loss_on: last_assistant_turn trains the final reply only.
    rows = [{"messages": TWO_TURNS}] * 2
    _, features, _ = _features(tmp_path, rows, tok, loss_on="last_assistant_turn")
    assert _trained(features[0], tok) == ["4</s>"]
    _, features, _ = _features(tmp_path, rows, tok, loss_on="all_assistant_turns")
    assert _trained(features[0], tok) == ["Hello.</s>", "4</s>"]


def test_plain_layout_without_a_chat_template(tmp_path, tokenizer):
    (ex,), (f,), _ = _features(tmp_path, [{"messages": TWO_TURNS}], tokenizer)
    assert _trained(f, tokenizer) == [" Hello.", " 4</s>"]
    assert tokenizer.decode(f["input_ids"]) == (
        "<s>### System: Be brief.\n### Human: Hi\n### Assistant: Hello.\n### Human: 2+2?\n### Assistant: 4</s>")
    assert ex.prompt == "### System: Be brief.\n### Human: Hi\n### Assistant: Hello.\n### Human: 2+2?\n### Assistant:"


def test_sharegpt_alpaca_and_prompt_completion_become_the_same_chat(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                                         {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    (_,), (f,), _ = _features(tmp_path, [sharegpt], tok)
    assert _trained(f, tok) == ["Hello.</s>", "4</s>"]
    assert tok.decode(f["input_ids"]) == tok.apply_chat_template(TWO_TURNS, tokenize=False).rstrip()

    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4", "system": "Be brief."},
              {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    _, (f1, f2), _ = _features(tmp_path, alpaca, tok)
    assert _trained(f1, tok) == ["4</s>"] and _trained(f2, tok) == ["Hi!</s>"]
    assert tok.decode(f1["input_ids"]) == "<s><|system|>\nBe brief.</s>\n<|user|>\nAdd the numbers.\n\n2 and 2</s>\n<|assistant|>\n4</s>"
    assert tok.decode(f2["input_ids"]) == "<s><|user|>\nSay hi.</s>\n<|assistant|>\nHi!</s>"

    pairs = [{"prompt": "Capital of France?", "completion": "Paris."},
             {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}]
    _, (f1, f2), _ = _features(tmp_path, pairs, tok)
    assert _trained(f1, tok) == ["Paris.</s>"] and _trained(f2, tok) == ["Hello.</s>"]
    assert tok.decode(f1["input_ids"]) == "<s><|user|>\nCapital of France?</s>\n<|assistant|>\nParis.</s>"


def test_guanaco_text_trains_every_reply(tmp_path, tokenizer):
    text = "### Human: Hi there.### Assistant: Hello!### Human: What is 2+2?### Assistant: It is 4."
    (ex,), (f,), _ = _features(tmp_path, [{"text": text}], tokenizer)
    assert _trained(f, tokenizer) == [" Hello!", " It is 4.</s>"]
    assert tokenizer.decode(f["input_ids"]) == "<s>" + text + "</s>"
    assert ex.prompt == "### Human: Hi there.### Assistant: Hello!### Human: What is 2+2?### Assistant:"
    (_,), (f,), _ = _features(tmp_path, [{"text": text}], tokenizer, format="guanaco")
    assert _trained(f, tokenizer) == [" Hello!", " It is 4.</s>"]


def test_truncated_conversation_keeps_its_first_whole_turns(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    long = TWO_TURNS[:3] + [{"role": "user", "content": "Tell me more. " * 20}, {"role": "assistant", "content": "No."}]
    _, (f,), stats = _features(tmp_path, [{"messages": long}], tok, max_len=64)
    assert _trained(f, tok) == ["Hello.</s>"] and len(f["input_ids"]) <= 64
    assert tok.decode(f["input_ids"]) == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>"
    assert stats["truncated_conversations"] == 1 and stats["skipped_too_long"] == 0
    # When not even the first reply fits, the conversation is skipped, never cut inside a reply.
    with pytest.raises(ValueError, match="no feature left from 1 example"):
        _features(tmp_path, [{"messages": long}], tok, max_len=40)


def test_bad_rows_in_every_format_are_skipped_and_counted(tmp_path, chat_tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]},
            {"conversations": [{"from": "human", "value": "nobody answers"}]},
            {"conversations": []}]
    path = _write_jsonl(tmp_path / "sg.jsonl", rows * 3)
    data = load_task_data(DataConfig(task="chat", path=path, format="sharegpt"), chat_tokenizer)
    assert data.stats["skipped_bad_messages"] == 3 and data.stats["skipped_no_assistant_turn"] == 3
    assert data.stats["skipped_empty_field"] == 3 and data.stats["rows_used"] == 3
    weights = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0.5}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0}]}]
    with pytest.raises(ValueError, match=r"row 1 of .*weight must be 0 or 1.*on_bad_row"):
        load_task_data(DataConfig(task="chat", path=_write_jsonl(tmp_path / "w.jsonl", weights), on_bad_row="error"))
    with pytest.raises(ValueError, match="every one of its 2 row"):
        load_task_data(DataConfig(task="chat", path=str(tmp_path / "w.jsonl")))
    alpaca = [{"instruction": "Say hi.", "output": ""}, {"instruction": "Say hi.", "output": "Hi"}] * 2
    data = load_task_data(DataConfig(task="chat", path=_write_jsonl(tmp_path / "a.jsonl", alpaca)))
    assert data.stats["skipped_empty_field"] == 2 and data.stats["rows_used"] == 2


def test_format_config_errors_name_the_way_out(tmp_path):
    with pytest.raises(ValueError, match="data.format .alpaca. reads conversations for task chat"):
        DataConfig(task="banking77", format="alpaca")
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"cannot tell the chat format.*data.format"):
        load_task_data(DataConfig(task="chat", path=path))
    with pytest.raises(ValueError, match=r"format 'alpaca' of task 'chat'.*'instruction'.*data.columns"):
        load_task_data(DataConfig(task="chat", path=path, format="alpaca"))
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    data = load_task_data(DataConfig(task="chat", path=_write_jsonl(tmp_path / "y.jsonl", rows), format="prompt_completion",
                                     columns={"prompt": "question", "completion": "answer"}))
    assert sorted(e.reference for e in data.train + data.validation) == ["a0", "a1", "a2", "a3"]


def test_a_template_that_rewrites_earlier_turns_uses_trls_training_version(tmp_path):
    """Qwen3's template drops the think block of earlier turns, so rendering prefixes cannot find its turns;
    trl ships a prefix-preserving training version of it, which is used (token-level check)."""
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    from data_helpers import make_tokenizer

    qwen3 = (Path(trl_templates.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    tok = make_tokenizer(qwen3)
    messages = [m for m in TWO_TURNS if m["role"] != "system"]
    (ex,), (f,), _ = _features(tmp_path, [{"messages": messages}], tok)
    assert _trained(f, tok) == ["<think>\n\n</think>\n\nHello.<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|></s>"]
    assert ex.prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
