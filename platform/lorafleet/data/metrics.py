"""Task metrics on generated text: accuracy and macro-F1 (classification), exact match (multiple
choice), ROUGE-L (summarisation). Chat and raw text have none here: their loss and perplexity
come from the training loop.

Example::

    >>> from lorafleet.data import get_task
    >>> compute_metrics(get_task("commonsense_qa"), [" B", "C."], ["B", "A"])
    {'exact_match': 0.5}
"""

from __future__ import annotations

import re
from functools import lru_cache

from lorafleet.data.tasks import TaskSpec

_LETTER_WORD = re.compile(r"\b([A-E])\b")
_ANY_LETTER = re.compile(r"([A-E])")


def normalize_answer(kind: str, text: str) -> str:
    """What a generated answer is compared as: the first line, stripped; for ``mcqa`` the first
    letter A-E found (a standalone letter first, so "Answer: D" gives "D"); for
    ``classification`` lowercase with ``_`` read as a space. Summaries, chat and raw text are only stripped."""
    text = (text or "").strip()
    if kind in ("summarization", "chat", "raw_text"):
        return text
    first = text.split("\n", 1)[0].strip()
    if kind == "mcqa":
        match = _LETTER_WORD.search(first) or _ANY_LETTER.search(first)
        return match.group(1) if match else ""
    if kind == "classification":
        # `card_arrival`, `Card arrival` and `card  arrival` are the same label (see verbalize_label).
        return " ".join(first.lower().replace("_", " ").split())
    return first


def _macro_f1(predictions: list[str], references: list[str]) -> float:
    """Macro-averaged F1 over the labels that occur in ``references`` (as sklearn's
    ``f1_score(average="macro", labels=sorted(set(references)))``): per label
    F1 = 2TP / (2TP + FP + FN); a prediction outside the reference labels only costs its true label."""
    scores = []
    for label in sorted(set(references)):
        tp = sum(1 for p, r in zip(predictions, references) if p == label and r == label)
        fp = sum(1 for p, r in zip(predictions, references) if p == label and r != label)
        fn = sum(1 for p, r in zip(predictions, references) if p != label and r == label)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def compute_metrics(task: TaskSpec, predictions: list[str], references: list[str]) -> dict[str, float]:
    """The task's metrics (``task.metrics`` names) of ``predictions`` against ``references``."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "give exactly one prediction per reference, in the same order")
    if task.kind in ("chat", "raw_text"):
        return {}
    if not references:
        raise ValueError(f"no predictions to score for task {task.name!r}; the evaluation set is empty")
    if task.kind == "summarization":
        scorer = _rouge_scorer()
        scores = [scorer.score(ref, pred or "")["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rouge_l": float(sum(scores) / len(scores))}
    preds = [normalize_answer(task.kind, p) for p in predictions]
    refs = [normalize_answer(task.kind, r) for r in references]
    accuracy = float(sum(p == r for p, r in zip(preds, refs)) / len(refs))
    if task.kind == "mcqa":
        return {"exact_match": accuracy}
    return {"accuracy": accuracy, "macro_f1": float(_macro_f1(preds, refs))}
