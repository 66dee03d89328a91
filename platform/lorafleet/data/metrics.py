"""Task metrics on generated text, by name: ``accuracy`` and ``macro_f1`` (classification),
``exact_match`` (multiple choice), ``rouge_l`` (summarisation). Each task names its metrics and
normalises answers before they are scored (its ``normalize``); chat and raw text have none here:
their loss and perplexity come from the training loop.

Example::

    >>> from lorafleet.data import get_task
    >>> compute_metrics(get_task("commonsense_qa"), [" B", "C."], ["B", "A"])
    {'exact_match': 0.5}
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from lorafleet.data.tasks import TaskSpec


def _accuracy(predictions: list[str], references: list[str]) -> float:
    return float(sum(p == r for p, r in zip(predictions, references)) / len(references))


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
    return float(sum(scores) / len(scores))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(predictions: list[str], references: list[str]) -> float:
    scorer = _rouge_scorer()
    scores = [scorer.score(ref, pred or "")["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return float(sum(scores) / len(scores))


# name -> f(normalised predictions, normalised references); the names a task (or data.custom_task) may use.
METRICS: dict[str, Callable[[list[str], list[str]], float]] = {
    "accuracy": _accuracy, "macro_f1": _macro_f1, "exact_match": _accuracy, "rouge_l": _rouge_l,
}
METRIC_ALIASES = {"rougeL": "rouge_l", "rouge-l": "rouge_l", "f1_macro": "macro_f1", "em": "exact_match"}


def score(name: str, predictions: list[str], references: list[str]) -> float:
    """Metric ``name`` of (already normalised) predictions against references."""
    return METRICS[name](predictions, references)


def normalize_answer(kind: Any, text: str) -> str:
    """What a generated answer of task kind ``kind`` (a name or a task) is compared as: its task type's
    ``normalize`` (classification: first line, lowercase, ``_`` as space; mcqa: the letter; others: stripped)."""
    from lorafleet.data.tasks import task_kind

    return task_kind(kind).normalize(text)


def compute_metrics(task: "TaskSpec", predictions: list[str], references: list[str]) -> dict[str, float]:
    """The task's metrics (``task.metrics`` names) of ``predictions`` against ``references``."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "give exactly one prediction per reference, in the same order")
    return task.compute_metrics(predictions, references)
