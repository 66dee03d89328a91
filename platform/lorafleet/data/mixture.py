"""The data of a run: one dataset, or a weighted mixture of datasets of different tasks.

Each dataset is loaded, validated and split 80/20 on its own (:func:`load_task_data`), so a
mixture's validation rows are the same rows a single-task run on that dataset would hold out.
Training draws from the mixture by weight (:func:`draw_mixture`): a fixed, seeded list of
(dataset, example) pairs per run, which the distributed sampler then shuffles every epoch, so
every rank sees the same mixture and a resumed run the same order. A single-task run is the
one-dataset case and draws every example once, in order.

Example::

    data = load_training_data(cfg.data, tokenizer)
    [(p.name, p.weight, len(p.data.train)) for p in data.parts]   # [('banking77', 0.5, 800), ('dialogsum', 0.5, 400)]
    data.metric_names()        # ['eval_loss', 'eval_perplexity', 'eval_score', 'eval/banking77/loss', 'eval/banking77/accuracy', ...]
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Optional

from lorafleet.config.train import DataConfig, MixtureDataset
from lorafleet.data.loading import TaskData, load_task_data
from lorafleet.data.tasks import TaskSpec, resolve_task

# The weighted mean over a mixture's datasets of each one's first metric: what a sweep of a mixture optimises.
SCORE_METRIC = "eval_score"


@dataclass
class MixturePart:
    """One dataset of a run: its name in metrics, its normalised weight and its loaded, split data."""

    name: str
    weight: float
    data: TaskData

    @property
    def task(self) -> TaskSpec:
        return self.data.task


@dataclass
class TrainingData:
    """What a run trains and validates on: one part per dataset (one for a single-task run)."""

    parts: list[MixturePart]
    mixture: bool  # several datasets (metrics per dataset) or data itself (metrics as before)
    size: Optional[int] = None  # data.mixture_size

    @property
    def name(self) -> str:
        """The run's task in tags, results and titles: the task, or the datasets' names joined by '+'."""
        return "+".join(p.name for p in self.parts) if self.mixture else self.parts[0].task.name

    @property
    def train(self) -> list:
        return [e for p in self.parts for e in p.data.train]

    @property
    def validation(self) -> list:
        return [e for p in self.parts for e in p.data.validation]

    @property
    def stats(self) -> dict[str, Any]:
        if not self.mixture:
            return dict(self.parts[0].data.stats)
        out: dict[str, Any] = {}
        for p in self.parts:
            for k, v in p.data.stats.items():
                out[k] = out.get(k, 0) + v
                out[f"{p.name}/{k}"] = v
        return out

    @property
    def fingerprint(self) -> str:
        """The content fingerprint of the run's data: the dataset's own, or one over every dataset, its name and weight."""
        if not self.mixture:
            return self.parts[0].data.fingerprint
        blob = json.dumps([[p.name, p.weight, p.data.fingerprint] for p in self.parts] + [self.size])
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """``banking77:0.5,dialogsum:0.3,...`` (a mixture) or the task name: logged as the run's ``mixture`` tag."""
        return ",".join(f"{p.name}:{p.weight:.4g}" for p in self.parts) if self.mixture else self.name

    def prompt_format(self) -> dict:
        """The prompt format saved with the adapter (``lorafleet_prompt.json``). A mixture's adapter answers several
        tasks, each with its own prompt: chat requests get the base's chat template, and each task's prompt goes to
        ``/v1/completions`` as trained (the description lists them)."""
        if not self.mixture:
            return self.parts[0].task.prompt_format()
        templates = "; ".join(f"{p.name}: {p.task.template!r}" if p.task.template else f"{p.name}: chat" for p in self.parts)
        return {"format_version": 1, "task": self.name, "kind": "mixture", "template": None, "fields": [],
                "description": "a mixture of tasks, each with its own prompt: send a task's prompt as trained to "
                               f"/v1/completions ({templates}); chat requests use the base's chat template"}

    def metric_names(self) -> list[str]:
        """Every metric a validation of this run reports (what a sweep may optimise)."""
        names = ["eval_loss", "eval_perplexity"]
        if not self.mixture:
            return names + [f"eval_{m}" for m in self.parts[0].task.metrics]
        names += [SCORE_METRIC] if any(primary_metric(p.task) for p in self.parts) else []
        for p in self.parts:
            names += [f"eval/{p.name}/loss"] + [f"eval/{p.name}/{m}" for m in p.task.metrics]
        return names


def _training_data(cfg: DataConfig, load) -> TrainingData:
    """A part per dataset of ``cfg`` (``load(dataset) -> TaskData``), weights normalised over the mixture."""
    datasets = cfg.datasets()
    total = sum(d.weight for d in datasets)
    parts = [MixturePart(d.metric_prefix(), d.weight / total, load(d)) for d in datasets]
    return TrainingData(parts, mixture=cfg.mixture is not None, size=cfg.mixture_size)


def load_training_data(cfg: DataConfig, tokenizer: Any = None) -> TrainingData:
    """Load, validate and split every dataset of ``cfg`` (:func:`load_task_data` each); errors name the dataset."""
    def load(d: MixtureDataset) -> TaskData:
        try:
            return load_task_data(d, tokenizer=tokenizer)
        except (ValueError, FileNotFoundError) as exc:
            if cfg.mixture is None:
                raise
            raise type(exc)(f"data.mixture[{d.metric_prefix()}]: {exc}") from exc

    return _training_data(cfg, load)


def draw_mixture(sizes: list[int], weights: list[float], total: Optional[int] = None, seed: int = 0) -> list[tuple[int, int]]:
    """(part, index) pairs of one epoch's training examples: part ``i`` gets ``round(total * weight_i)`` of them
    (``total``: the sizes summed), largest remainders first so they add up to ``total``. A part drawn fewer times than
    it has examples gets a seeded sample of them; more times, every example ``k`` times and a seeded sample for the
    rest. One part with no total draws each example once, in order."""
    if len(sizes) != len(weights) or not sizes:
        raise ValueError(f"draw_mixture needs one weight per part, got sizes {sizes} and weights {weights}")
    if any(n < 1 for n in sizes):
        raise ValueError(f"every dataset of a mixture needs at least one training example, got sizes {sizes}")
    total = sum(sizes) if total is None else total
    if len(sizes) == 1 and total == sizes[0]:
        return [(0, j) for j in range(sizes[0])]
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    drawn = []
    for i, (n, count) in enumerate(zip(sizes, counts)):
        whole, rest = divmod(count, n)
        indices = list(range(n)) * whole + sorted(rng.sample(range(n), rest))
        drawn += [(i, j) for j in indices]
    return drawn


def primary_metric(task: TaskSpec) -> Optional[str]:
    """The metric of a task that the mixture's score averages: its first (accuracy, exact_match, rouge_l...)."""
    return task.metrics[0] if task.generation_metrics else None


def datasets_of(cfg: DataConfig) -> TrainingData:
    """The run's datasets, names, weights and tasks from the config alone, without their rows (no file is read):
    enough for :meth:`TrainingData.metric_names`, :meth:`~TrainingData.prompt_format` and ``name``."""
    return _training_data(cfg, lambda d: TaskData(resolve_task(d), [], [], None))


def mixture_score(parts: list[MixturePart], metrics: dict[str, float]) -> Optional[float]:
    """The weighted mean of each dataset's first metric (``metrics`` holds ``eval/<name>/<metric>``); None if no
    dataset has a generation metric. Datasets without one (chat, raw text) do not count, and the rest's weights
    are renormalised."""
    scored = [(p.weight, metrics[f"eval/{p.name}/{m}"]) for p in parts
              if (m := primary_metric(p.task)) and f"eval/{p.name}/{m}" in metrics]
    if not scored:
        return None
    return sum(w * v for w, v in scored) / sum(w for w, _ in scored)


def training_features(data: TrainingData, tokenizer: Any, max_seq_length: int, packing: bool = False,
                      seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """The tokenised training features of one epoch (each dataset tokenised with its own task, then drawn by weight)
    and the tokenisation stats (a mixture's also per dataset, with how many examples each contributes)."""
    from lorafleet.data.tokenize import tokenize_examples

    per_part = [tokenize_examples(p.data.train, tokenizer, max_seq_length, p.task, packing) for p in data.parts]
    if not data.mixture:
        return per_part[0]
    for p, (feats, _) in zip(data.parts, per_part):
        if not feats:
            raise ValueError(f"data.mixture[{p.name}]: no training example fits training.max_seq_length={max_seq_length}")
    drawn = draw_mixture([len(f) for f, _ in per_part], [p.weight for p in data.parts], data.size, seed)
    features = [per_part[i][0][j] for i, j in drawn]
    stats: dict[str, Any] = {}
    for p, (feats, part_stats) in zip(data.parts, per_part):
        for k, v in part_stats.items():
            stats[k] = stats.get(k, 0) + v
            stats[f"{p.name}/{k}"] = v
    counts = [sum(1 for i, _ in drawn if i == k) for k in range(len(data.parts))]
    stats.update({f"{p.name}/drawn": n for p, n in zip(data.parts, counts)})
    stats["features"] = len(features)
    return features, stats
