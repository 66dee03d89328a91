"""Loading task data from local files or the Hugging Face hub into prompt/completion examples.

Example::

    cfg = DataConfig(task="banking77", path="data/banking77/train.csv")
    data = load_task_data(cfg)          # 80/20 split by cfg.seed
    data.train[0].prompt, data.train[0].completion   # ('Query: ...\\nIntent:', ' card arrival')

Rows that cannot become an example (blank field, label outside the closed label set,
malformed choices...) are skipped and counted in ``TaskData.stats`` as ``skipped_<reason>``,
or raise with ``data.on_bad_row: error``. The same file and config always give the same
split and the same ``fingerprint``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lorafleet.config.train import DataConfig
from lorafleet.data.rows import BadRow, Example
from lorafleet.data.tasks import ReadContext, TaskSpec, get_task, resolve_task

logger = logging.getLogger(__name__)

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                ".parquet": "parquet", ".txt": "text"}


@dataclass
class TaskData:
    """The examples of one task, split, with what was skipped and a content fingerprint."""

    task: TaskSpec
    train: list[Example]
    validation: list[Example]
    labels: Optional[list[str]]
    stats: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""


# -- reading files ---------------------------------------------------------------------
def read_rows(path: Union[str, Path], text_column: str = "text") -> list[dict]:
    """Rows of a local CSV/TSV, JSONL, JSON, Parquet or .txt file, or of every such file in a folder
    (sorted by name, recursively). A .txt file gives one row ``{text_column: line}`` per non-blank line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file or folder not found: {path} (check data.path / data.validation_path)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"folder {path} holds no data file; expected one of {', '.join(sorted(FILE_FORMATS))}")
        return [row for f in files for row in read_rows(f, text_column)]
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot read {path}: unknown extension {path.suffix!r}; use one of {', '.join(sorted(FILE_FORMATS))}")
    if fmt == "csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long dialogues exceed the 128 KiB default
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            return [{k: v for k, v in row.items() if k is not None} for row in reader]
    if fmt == "text":
        with path.open(encoding="utf-8") as fh:
            return [{text_column: line.rstrip("\r\n")} for line in fh if line.strip()]
    if fmt == "parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if fmt == "json":
        try:
            return _json_rows(json.loads(text), path)
        except json.JSONDecodeError:
            pass  # a .json file holding JSON lines
    rows = []
    # JSON lines end at \n only: str.splitlines also breaks at U+2028, U+0085..., which JSON strings may hold
    # unescaped (the files API checks uploads with this numbering).
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno} of {path} is not valid JSON ({exc}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {lineno} of {path} is a JSON {type(row).__name__}, expected an object with named fields")
        rows.append(row)
    return rows


def _json_rows(data: Any, path: Path) -> list[dict]:
    """A JSON list of objects, a {column: [values]} table, or {"data": [objects]}."""
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lists = list(data.values())
        if len(data) == 1 and all(isinstance(r, dict) for r in lists[0]):
            return lists[0]
        if len({len(v) for v in lists}) == 1:
            return [dict(zip(data, values)) for values in zip(*lists)]
    raise ValueError(f"{path}: expected a JSON list of objects, a {{column: [values]}} table or JSON lines")


def _load_hub(name: str, config: Optional[str], split: str) -> tuple[list[dict], dict[str, list[str]]]:
    """Rows of a hub dataset split and the class names of its ClassLabel columns."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, auth, unknown split...: say what was asked for and the way out
        raise ValueError(f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {exc}. "
                         "Without network access, set data.path to a local CSV/JSONL/Parquet file.") from exc
    class_names = {col: list(feat.names) for col, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)}
    return ds.to_list(), class_names


# -- rows to examples ------------------------------------------------------------------
def _resolve_columns(task: TaskSpec, found: list[str], columns: dict[str, str], source: str,
                     fmt: str = "auto") -> dict[str, str]:
    """Map each logical field of ``task`` (for a chat task: of its format ``fmt``) to a column of the file:
    data.columns, the field's own name, then the task's default column. Optional fields map when present."""
    fields, optional, defaults, reader = task.column_fields(found, columns, fmt)
    unknown = sorted(set(columns) - set(fields) - set(optional))
    if unknown:
        raise ValueError(f"data.columns names {unknown}, which {reader} does not read; "
                         f"its fields are {list(fields) + list(optional)} (map each as data.columns.<field>=<column in the file>)")
    resolved = {name: columns.get(name, name) for name in optional if columns.get(name, name) in found}
    missing = []
    for name in fields:
        candidates = [columns[name]] if name in columns else [name, defaults.get(name)]
        column = next((c for c in candidates if c and c in found), None)
        if column is not None:
            resolved[name] = column
        elif not task.field_optional(name, found):
            missing.append((name, [c for c in candidates if c]))
    if missing:
        wanted = "; ".join(f"field {n!r} (looked for column {' or '.join(repr(c) for c in cs)})" for n, cs in missing)
        example = " ".join(f"--set data.columns.{n}=<column>" for n, _ in missing)
        raise ValueError(f"{reader}: {source} lacks {wanted}. Columns found: {found}. "
                         f"Map them with data.columns (e.g. {example}).")
    return resolved


class _Skips:
    """Counts skipped rows per reason and logs each reason once with its count and a first example."""

    def __init__(self, on_bad_row: str):
        self.on_bad_row = on_bad_row
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, message: str, where: str) -> None:
        if self.on_bad_row == "error":
            raise ValueError(f"{where}: {message}. Fix the data, or set data.on_bad_row: skip to skip and count such rows.")
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{where}: {message}")

    def log(self, source: str) -> None:
        for reason, count in sorted(self.counts.items()):
            logger.warning("%s: skipped %d row(s) (%s); first: %s", source, count, reason, self.first[reason])


def _to_examples(task: TaskSpec, rows: list[dict], source: str, columns: dict[str, str], closed: Optional[set[str]],
                 class_names: dict[str, list[str]], skips: _Skips, tokenizer: Any = None, fmt: str = "auto",
                 loss_on: str = "all_assistant_turns") -> list[Example]:
    found = list(dict.fromkeys(k for row in rows for k in row))
    fmt = task.resolve_format(found, columns, fmt)  # a chat format is told per file
    resolved = _resolve_columns(task, found, columns, source, fmt)
    label_col = resolved.get("label")
    ctx = ReadContext(fmt=fmt, loss_on=loss_on, closed=closed,
                      index_names=class_names.get(label_col) if label_col else None)
    examples = []
    for i, raw in enumerate(rows):
        row = dict(raw)
        row.update({name: raw.get(col) for name, col in resolved.items()})
        try:
            examples.append(task.make_example(row, tokenizer, ctx))
        except BadRow as bad:
            skips.add(bad.reason, str(bad), f"row {i + 1} of {source}")
    skips.log(source)
    return examples


def _fingerprint(task: TaskSpec, labels: Optional[list[str]], train: list[Example], validation: list[Example]) -> str:
    def rows(examples):
        return [[e.prompt, e.completion, e.input, e.reference] + ([e.segments] if e.segments else []) for e in examples]

    blob = json.dumps({"task": task.name, "labels": labels, "train": rows(train), "validation": rows(validation)},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_source(cfg: DataConfig, task: TaskSpec, path: Optional[str], split: str) -> tuple[list[dict], dict, str]:
    """(rows, ClassLabel names, source description) of a local path or a hub split."""
    if path:
        return read_rows(path), {}, str(path)
    hub_name = cfg.hub_name or task.hub_name
    if not hub_name:
        raise ValueError(f"task {task.name!r} has no hub dataset: set data.path to a local file or folder "
                         "(or data.hub_name to a hub dataset)")
    hub_config = cfg.hub_config if cfg.hub_config is not None else task.hub_config
    rows, names = _load_hub(hub_name, hub_config, split)
    return rows, names, f"{hub_name}[{split}]"


def load_task_data(cfg: DataConfig, tokenizer: Any = None) -> TaskData:
    """Load, validate, format and split the data that ``cfg`` describes.

    Source: ``cfg.path`` when set, else the hub (``cfg.hub_name`` or the task's, split ``cfg.split``).
    Validation: ``cfg.validation_path``, else hub split ``cfg.validation_split``, else a seeded
    ``cfg.validation_fraction`` of the rows. ``tokenizer`` is only needed to render ``chat`` messages
    with its chat template; without it a plain ``### Human: / ### Assistant:`` layout is used.
    """
    task = resolve_task(cfg)
    if cfg.labels is not None and not task.takes_labels:
        raise ValueError(f"data.labels ({cfg.labels}) is a closed label set for classification tasks, but task "
                         f"{task.name!r} is {task.kind}; remove data.labels")
    if cfg.path and cfg.validation_split:
        raise ValueError(f"data.validation_split ({cfg.validation_split!r}) selects a hub split, but data.path "
                         f"({cfg.path!r}) is a local source; give the validation file as data.validation_path")
    closed = task.closed_labels(cfg.labels)
    skips = _Skips(cfg.on_bad_row)
    rows, names, source = _read_source(cfg, task, cfg.path, cfg.split)
    stats = {"rows_read": len(rows)}
    examples = _to_examples(task, rows, source, cfg.columns, closed, names, skips, tokenizer, cfg.format, cfg.loss_on)
    if not examples:
        raise ValueError(f"{source}: every one of its {len(rows)} row(s) was skipped ({dict(skips.counts)}); "
                         "check the data file, data.columns and data.labels (the log names the first bad row per reason)")

    separate = cfg.validation_path or cfg.validation_split
    if separate:
        vrows, vnames, vsource = _read_source(cfg, task, cfg.validation_path, cfg.validation_split or "")
        stats["rows_read"] += len(vrows)
        validation = _to_examples(task, vrows, vsource, cfg.columns, closed, vnames, skips, tokenizer, cfg.format,
                                  cfg.loss_on)
        train = examples
    else:
        if len(examples) < 2:
            raise ValueError(f"{source}: {len(examples)} usable row(s), need at least 2 to split off a validation set "
                             "(or give data.validation_path)")
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_val = min(max(1, round(len(examples) * cfg.validation_fraction)), len(examples) - 1)
        validation = [examples[i] for i in sorted(order[:n_val])]
        train = [examples[i] for i in sorted(order[n_val:])]
    if not train or not validation:
        which = "training" if not train else "validation"
        raise ValueError(f"no usable {which} rows left after skipping bad rows ({dict(skips.counts)}); "
                         "check the data file, data.columns and data.labels")

    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        # A seeded sample, not the first N: files are often sorted by label.
        keep = sorted(random.Random(cfg.seed + 1).sample(range(len(train)), cfg.max_train_samples))
        stats["dropped_max_train_samples"] = len(train) - len(keep)
        train = [train[i] for i in keep]

    labels = task.label_names(closed, train)
    stats.update({"rows_used": len(train) + len(validation), "train_examples": len(train),
                  "validation_examples": len(validation)})
    stats.update({f"skipped_{reason}": n for reason, n in sorted(skips.counts.items())})
    return TaskData(task=task, train=train, validation=validation, labels=labels, stats=stats,
                    fingerprint=_fingerprint(task, labels, train, validation))


def load_eval_examples(task: Union[TaskSpec, str], path: str, columns: Optional[dict[str, str]] = None,
                       limit: Optional[int] = None, labels: Optional[list[str]] = None, tokenizer: Any = None,
                       on_bad_row: str = "skip", fmt: str = "auto") -> list[Example]:
    """Every usable row of ``path`` as an example, in file order, formatted and validated as in
    :func:`load_task_data` (no split). ``limit`` keeps the first N examples; ``fmt``: a chat task's data.format."""
    spec = get_task(task) if isinstance(task, str) else task
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every row), got {limit}")
    rows = read_rows(path)
    examples = _to_examples(spec, rows, str(path), dict(columns or {}), spec.closed_labels(labels), {},
                            _Skips(on_bad_row), tokenizer, fmt)
    if not examples:
        raise ValueError(f"{path}: none of its {len(rows)} row(s) is a usable {spec.name!r} example")
    return examples[:limit] if limit is not None else examples
