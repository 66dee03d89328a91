"""Task metrics on hand-computed cases."""

from __future__ import annotations

import pytest

from lorafleet.data import compute_metrics, get_task, normalize_answer


def test_normalize_answer():
    assert normalize_answer("classification", "  Card_Arrival\nQuery: more") == "card arrival"
    assert normalize_answer("mcqa", " B") == "B"
    assert normalize_answer("mcqa", "Answer: D.") == "D"
    assert normalize_answer("mcqa", "(c)") == ""  and normalize_answer("mcqa", "xCx") == "C"
    assert normalize_answer("summarization", " two lines\nof summary ") == "two lines\nof summary"


def test_accuracy_and_macro_f1():
    refs = ["a", "a", "b", "c"]
    preds = [" a\nnext query", "b", "B", "a"]
    m = compute_metrics(get_task("classification"), preds, refs)
    assert m["accuracy"] == pytest.approx(0.5)
    # per label F1 = 2TP/(2TP+FP+FN): a: 2/(2+1+1)=0.5, b: 2/(2+1+0)=2/3, c: 0/(0+0+1)=0
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    perfect = compute_metrics(get_task("banking77"), ["card_arrival", "age_limit"], ["card_arrival", "age_limit"])
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0}


def test_exact_match():
    assert compute_metrics(get_task("commonsense_qa"), [" B", "C.", "Answer: E", ""], ["B", "A", "E", "D"]) == {"exact_match": 0.5}


def test_rouge_l_with_stemming():
    spec = get_task("dialogsum")
    # LCS "the cat on the mat" = 5 tokens: P = 5/5, R = 5/6, F = 10/11.
    assert compute_metrics(spec, ["the cat on the mat"], ["the cat sat on the mat"])["rouge_l"] == pytest.approx(10 / 11)
    # Porter stemming: dogs/dog and running/runs match.
    assert compute_metrics(spec, ["dog runs"], ["dogs running"])["rouge_l"] == pytest.approx(1.0)
    both = compute_metrics(spec, ["the cat on the mat", "nothing alike"], ["the cat sat on the mat", "zebra"])
    assert both == {"rouge_l": pytest.approx((10 / 11 + 0) / 2)}


def test_chat_and_raw_text_have_no_generation_metrics_and_lengths_must_match():
    assert compute_metrics(get_task("chat"), ["hi"], ["hello"]) == {}
    assert compute_metrics(get_task("raw_text"), ["hi"], ["hello"]) == {}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(get_task("banking77"), ["a", "b"], ["a"])


def test_verbalized_label_matches_its_reference_name():
    """Classification completions are trained as words (card arrival) and scored against names (card_arrival)."""
    from lorafleet.data import compute_metrics, get_task
    from lorafleet.data.tasks import verbalize_label

    spec = get_task("banking77")
    assert verbalize_label("card_arrival") == "card arrival"
    scores = compute_metrics(spec, ["card arrival", "Card_Arrival", "lost or stolen card"], ["card_arrival"] * 3)
    assert scores["accuracy"] == 2 / 3
