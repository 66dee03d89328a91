"""Task catalogue, data loading, prompt formatting, completion-only tokenisation, metrics and
evaluation by generation.

Example::

    from lorafleet.data import get_task, load_task_data, tokenize_examples, evaluate_generation
    data = load_task_data(cfg.data)
    features, stats = tokenize_examples(data.train, tokenizer, 256, data.task)
"""

from lorafleet.data.generation import clean_prediction, evaluate_generation, generate_completions
from lorafleet.data.loading import TaskData, load_eval_examples, load_task_data, read_rows
from lorafleet.data.metrics import METRICS, compute_metrics, normalize_answer
from lorafleet.data.rows import Example
from lorafleet.data.tasks import BadRow, TaskKind, TaskSpec, get_task, list_tasks, register_kind, register_task
from lorafleet.data.tokenize import IGNORE_INDEX, collate_batch, encode_prompts, pack_features, tokenize_examples

__all__ = [
    "IGNORE_INDEX", "METRICS", "BadRow", "Example", "TaskData", "TaskKind", "TaskSpec", "clean_prediction", "collate_batch",
    "compute_metrics", "encode_prompts", "evaluate_generation", "generate_completions", "get_task", "list_tasks",
    "load_eval_examples", "load_task_data", "normalize_answer", "pack_features", "read_rows", "register_kind", "register_task", "tokenize_examples",
]
