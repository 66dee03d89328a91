"""Completion-only masking, length handling, packing and collation, on a real BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data import Example, collate_batch, get_task, tokenize_examples

IGNORE = -100


def _ex(prompt: str, completion: str) -> Example:
    return Example(prompt=prompt, completion=completion, input=prompt, reference=completion.strip())


def test_labels_cover_exactly_the_completion_and_eos(tokenizer):
    examples = [_ex("Query: I am still waiting on my card.\nIntent:", " card_arrival"),
                _ex("Question: Where?\nA. here\nB. there\nAnswer:", " B"),
                _ex("Dialogue:\n#Person1#: Hi.\nSummary:", " They greet each other.")]
    features, stats = tokenize_examples(examples, tokenizer, max_seq_length=128, kind="classification")
    assert len(features) == 3 and stats["skipped_too_long"] == 0
    for ex, f in zip(examples, features):
        ids, labels = f["input_ids"], f["labels"]
        assert len(ids) == len(labels) and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        n_prompt = labels.index(next(t for t in labels if t != IGNORE))
        assert all(t == IGNORE for t in labels[:n_prompt])  # bos + prompt carry no loss
        assert all(t != IGNORE for t in labels[n_prompt:])
        assert tokenizer.decode(ids[1:n_prompt]) == ex.prompt
        assert tokenizer.decode(labels[n_prompt:]) == ex.completion + tokenizer.eos_token
        assert labels[n_prompt:] == ids[n_prompt:]
    assert stats["tokens"] == sum(len(f["input_ids"]) for f in features)
    assert stats["target_tokens"] == sum(sum(t != IGNORE for t in f["labels"]) for f in features)


def test_a_template_without_bos_is_trained_and_prompted_as_vllm_renders_it(tmp_path):
    """A chat template that writes no bos (the tiny base's, Phi-3's): the model sees exactly the template's
    tokens in training and evaluation, as vLLM's chat API and `apply_chat_template(tokenize=True)` give it at
    inference; a prompt/completion example of the same tokenizer still starts with bos."""
    from data_helpers import make_tokenizer

    from lorafleet.data import encode_prompts, generate_completions
    from lorafleet.data.tasks.base import ReadContext

    tok = make_tokenizer("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}### assistant:{% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ex = get_task("chat").make_example({"messages": messages}, tok, ReadContext(fmt="auto", loss_on="all_assistant_turns"))
    assert ex.bos is False
    (f,), _ = tokenize_examples([ex], tok, 64, "chat")
    served = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    served = served["input_ids"] if isinstance(served, dict) or hasattr(served, "keys") else served
    assert tok.bos_token_id not in f["input_ids"] and f["input_ids"][: len(served)] == list(served)
    assert encode_prompts(tok, [ex.prompt], [ex.bos]) == [list(served)]
    assert encode_prompts(tok, [ex.prompt])[0] == [tok.bos_token_id, *served]  # the default stays bos + prompt
    (plain,), _ = tokenize_examples([_ex("Query: hi\nIntent:", " greeting")], tok, 64, "classification")
    assert plain["input_ids"][0] == tok.bos_token_id
    with pytest.raises(ValueError, match="1 value"):
        generate_completions(None, tok, ["a", "b"], max_new_tokens=1, add_bos=[True])


def test_chat_template_bos_is_not_doubled(chat_tokenizer):
    spec = get_task("chat")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    ex = Example(*spec.format_example(row, chat_tokenizer))
    (f,), _ = tokenize_examples([ex], chat_tokenizer, 64, "chat")
    assert f["input_ids"][0] == chat_tokenizer.bos_token_id and f["input_ids"][1] != chat_tokenizer.bos_token_id
    n_prompt = sum(t == IGNORE for t in f["labels"])
    assert chat_tokenizer.decode(f["labels"][n_prompt:]) == "Hello.</s>"


def test_over_long_examples_are_skipped_never_truncated(tokenizer):
    short = _ex("Text: ok\nLabel:", " yes")
    long = _ex("Text: " + "words and more words " * 20 + "\nLabel:", " no")
    features, stats = tokenize_examples([short, long, short], tokenizer, max_seq_length=24, kind="classification")
    assert len(features) == 2 and stats["skipped_too_long"] == 1 and stats["examples"] == 3
    with pytest.raises(ValueError, match="raise training.max_seq_length"):
        tokenize_examples([long], tokenizer, max_seq_length=24, kind="classification")


def test_raw_text_labels_everything_and_truncates_long_lines(tokenizer):
    texts = ["I am still waiting on my card.", "word " * 100]
    examples = [_ex("", t) for t in texts]
    features, stats = tokenize_examples(examples, tokenizer, max_seq_length=32, kind="raw_text")
    assert len(features) == 2 and stats["truncated"] == 1 and stats["skipped_too_long"] == 0
    assert all(f["labels"] == f["input_ids"] for f in features)
    assert tokenizer.decode(features[0]["input_ids"]) == "<s>" + texts[0] + "</s>"
    assert len(features[1]["input_ids"]) == 32


def test_packing_cuts_equal_blocks_and_drops_the_tail(tokenizer):
    texts = [f"Line number {i} of the corpus, about my card." for i in range(40)]
    ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    total = sum(len(x) for x in ids)
    features, stats = tokenize_examples([_ex("", t) for t in texts], tokenizer, max_seq_length=64, kind="raw_text",
                                        packing=True)
    assert len(features) == total // 64 and all(len(f["input_ids"]) == 64 for f in features)
    assert stats["tokens_dropped"] == total % 64 and stats["tokens"] == 64 * len(features)
    assert [t for f in features for t in f["input_ids"]] == [t for x in ids for t in x][: 64 * len(features)]
    assert all(f["labels"] == f["input_ids"] for f in features)
    # Other kinds keep one feature per example: pack_features packs them whole (tests/data/test_data_packing.py).
    sft = [_ex("Text: a\nLabel:", " b"), _ex("Text: c\nLabel:", " d")]
    assert tokenize_examples(sft, tokenizer, 64, "classification", packing=True) == tokenize_examples(sft, tokenizer, 64, "classification")


def test_collate_right_pads_with_ignored_labels(tokenizer):
    features = [{"input_ids": [1, 5, 6, 7], "labels": [IGNORE, IGNORE, 6, 7]}, {"input_ids": [1, 9], "labels": [1, 9]}]
    batch = collate_batch(features, pad_token_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 6, 7], [1, 9, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="pad token"):
        collate_batch(features, pad_token_id=None)
