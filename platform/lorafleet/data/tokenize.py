"""Tokenising examples with completion-only labels, and collating them into padded batches.

A feature is ``{"input_ids": [...], "labels": [...]}`` for the sequence
``bos + prompt + completion + eos``. Prompt and completion are tokenised separately and the
ids concatenated, so the boundary is exact; labels are ``-100`` on bos and the prompt (loss
on the completion and eos only), except for ``raw_text`` where ``labels == input_ids``.
A conversation (``Example.segments``) is tokenised piece by piece the same way: labels on
the trained assistant turns (and the eos after the last one), ``-100`` on everything else.
A conversation rendered by the tokenizer's chat template gets no bos of its own
(``Example.bos``): its tokens are the template's, as vLLM's chat API and
``apply_chat_template(tokenize=True)`` feed the model at inference.

With packing, whole features share rows of ``max_seq_length`` tokens (:func:`pack_features`):
each keeps its labels, its ``position_ids`` restart at 0, and Transformers keeps attention
within each one (see :func:`collate_batch`).

Example::

    features, stats = tokenize_examples(data.train, tokenizer, max_seq_length=256, kind="classification")
    batch = collate_batch(features[:8], tokenizer.pad_token_id)   # input_ids, attention_mask, labels
    rows = pack_features(features, max_seq_length=256)           # fewer rows, each with position_ids
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Optional, Sequence, Union

import torch

from lorafleet.data.tasks import task_kind

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _encode_many(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call: fast tokenizers run it in Rust)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


# Examples per tokenizer call when tokenising with progress: large enough that the batched Rust
# tokenizer stays fast, small enough for the bar to move on a million-row data set.
_CHUNK = 4096
# Below this many examples tokenising takes a second or two: no bar.
_PROGRESS_MIN_EXAMPLES = 20_000


def _encode_with_progress(tokenizer: Any, columns: list[list[str]]) -> list[list[list[int]]]:
    """``_encode_many`` of each of ``columns`` (equally long lists of texts), in chunks of rows, with progress
    (a bar in a terminal, log lines in logs; rank 0 only in a distributed job)."""
    import torch.distributed as dist

    from lorafleet.progress import Progress

    n = len(columns[0]) if columns else 0
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out: list[list[list[int]]] = [[] for _ in columns]
    with Progress(n, "tokenising", unit="example", enabled=rank0 and n >= _PROGRESS_MIN_EXAMPLES) as bar:
        for start in range(0, n, _CHUNK):
            for col, texts in zip(out, columns):
                col.extend(_encode_many(tokenizer, texts[start:start + _CHUNK]))
            bar.update(min(_CHUNK, n - start))
    return out


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` preceded by bos when the tokenizer has one and the ids (e.g. a rendered chat template) lack it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


def bos_flags(add_bos: Union[bool, Sequence[bool]], n: int) -> list[bool]:
    """``add_bos`` for each of ``n`` prompts (one value for all, or one each)."""
    if isinstance(add_bos, bool):
        return [add_bos] * n
    flags = list(add_bos)
    if len(flags) != n:
        raise ValueError(f"add_bos has {len(flags)} value(s) for {n} prompt(s)")
    return flags


def encode_prompts(tokenizer: Any, prompts: Sequence[str], add_bos: Union[bool, Sequence[bool]] = True) -> list[list[int]]:
    """Prompt ids exactly as training sees them: bos (if any, where ``add_bos``: not for a prompt rendered by the
    chat template, see ``Example.bos``) + prompt tokens, no eos."""
    flags = bos_flags(add_bos, len(prompts))
    return [_with_bos(tokenizer, ids) if bos else ids for ids, bos in zip(_encode_many(tokenizer, prompts), flags)]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; completions must end with one "
                         "(set tokenizer.eos_token, e.g. to '</s>')")
    return eos


def _pieces_feature(tokenizer: Any, encoded: list[tuple[list[int], bool]], eos: int,
                    max_seq_length: int, bos: bool = True) -> tuple[Optional[dict[str, list[int]]], bool]:
    """bos (where ``bos``) + the pieces (labels on the trained ones) + eos after the last reply (unless it ends with one).
    Too long: cut after the last trained piece that fits with its eos (a conversation keeps its first
    whole turns; a single reply is never cut). Returns (feature or None when not even the first fits, cut)."""
    input_ids, labels, best = [], [], None
    for k, (ids, trained) in enumerate(encoded):
        if k == 0 and bos:
            ids = _with_bos(tokenizer, ids)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if not trained:
            continue
        end = [] if input_ids and input_ids[-1] == eos else [eos]
        if len(input_ids) + len(end) > max_seq_length:
            return best, True
        best = {"input_ids": input_ids + end, "labels": labels + end}
    return best, False


def tokenize_examples(examples: list, tokenizer: Any, max_seq_length: int, kind: Any,
                      packing: bool = False) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Turn examples into features and report what happened.

    Examples longer than ``max_seq_length`` are skipped (``stats["skipped_too_long"]``): a
    truncated completion would teach a wrong answer. A conversation that does not fit keeps its
    first whole trained turns (``stats["truncated_conversations"]``), or is skipped if none fits. ``raw_text`` lines are truncated instead
    (``stats["truncated"]``), or, with ``packing``, all texts (each followed by eos) are
    concatenated and cut into blocks of ``max_seq_length`` (the last partial block dropped), as in
    pre-training. ``packing`` changes nothing for other kinds: their features stay one per example,
    to be packed whole by :func:`pack_features` (after tokenising, so that examples of several
    tasks can share rows). ``kind``: the task (or its kind's name). Stats also give ``examples``,
    ``features``, ``tokens`` (in the features) and ``target_tokens`` (those with a label).
    """
    whole_text = task_kind(kind).trains_whole_text
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    eos = _eos_id(tokenizer)
    stats = {"examples": len(examples), "skipped_too_long": 0, "truncated": 0}
    features: list[dict[str, list[int]]] = []

    if whole_text:
        texts = [e.prompt + e.completion for e in examples]
        encoded = _encode_with_progress(tokenizer, [texts])[0]
        if packing:
            stream = [tok for ids in encoded for tok in ids + [eos]]
            n_blocks = len(stream) // max_seq_length
            stats["tokens_dropped"] = len(stream) - n_blocks * max_seq_length
            for b in range(n_blocks):
                block = stream[b * max_seq_length:(b + 1) * max_seq_length]
                features.append({"input_ids": block, "labels": list(block)})
        else:
            for ids in encoded:
                ids = _with_bos(tokenizer, ids) + [eos]
                if len(ids) > max_seq_length:
                    ids = ids[:max_seq_length]
                    stats["truncated"] += 1
                features.append({"input_ids": ids, "labels": list(ids)})
    else:
        # Every example as pieces of text, each trained or not: a conversation's segments, else prompt + completion.
        pieces = [e.segments if getattr(e, "segments", None) else ((e.prompt, False), (e.completion, True)) for e in examples]
        flat = _encode_with_progress(tokenizer, [[text for parts in pieces for text, _ in parts]])[0]
        at = 0
        for e, parts in zip(examples, pieces):
            encoded = [(ids, trained) for ids, (_, trained) in zip(flat[at:at + len(parts)], parts)]
            at += len(parts)
            feature, cut = _pieces_feature(tokenizer, encoded, eos, max_seq_length, getattr(e, "bos", True))
            if feature is None:
                stats["skipped_too_long"] += 1
                continue
            if cut:
                stats["truncated_conversations"] = stats.get("truncated_conversations", 0) + 1
            features.append(feature)

    stats["features"] = len(features)
    stats["tokens"] = sum(len(f["input_ids"]) for f in features)
    stats["target_tokens"] = sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features)
    if stats["skipped_too_long"]:
        logger.warning("skipped %d of %d example(s) longer than max_seq_length=%d tokens",
                       stats["skipped_too_long"], len(examples), max_seq_length)
    if stats["truncated"]:
        logger.warning("truncated %d of %d raw text line(s) to max_seq_length=%d tokens",
                       stats["truncated"], len(examples), max_seq_length)
    if examples and not features:
        raise ValueError(f"no feature left from {len(examples)} example(s) at max_seq_length={max_seq_length} "
                         f"({stats}); raise training.max_seq_length or use shorter examples")
    return features, stats


def pack_features(features: list[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Whole features packed into rows of at most ``max_seq_length`` tokens, for less padding.

    Best-fit decreasing: longest feature first, each into the fullest row it still fits in
    (ties: the earlier row), else a new row. It depends only on the lengths and their order, so
    every rank packs the same feature list into the same rows. A row is ``{"input_ids",
    "labels", "position_ids"}``: each feature keeps its labels, except its first token, which
    carries none (it would be predicted from the previous feature's last token), and its
    ``position_ids`` restart at 0, so that :func:`collate_batch` and Transformers keep attention
    within each feature. A feature on its own needs no label on its first token either (nothing
    predicts position 0), so packed and unpacked features train the same target tokens.

    Example::

        rows = pack_features([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
                              {"input_ids": [1, 7], "labels": [1, 7]}], max_seq_length=8)
        # [{"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "position_ids": [0, 1, 2, 0, 1]}]
    """
    for i, f in enumerate(features):
        if len(f["input_ids"]) > max_seq_length:
            raise ValueError(f"feature {i} has {len(f['input_ids'])} tokens, more than max_seq_length={max_seq_length}; "
                             "tokenize_examples skips such examples (tokenise with the same max_seq_length)")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # stable: ties keep order
    rows: list[list[int]] = []  # indices of the features in each row
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order:
        n = len(features[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))  # the row with the fewest tokens left that still fit n
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if left > n:
            bisect.insort(free, (left - n, row))
    packed = []
    for members in rows:
        input_ids, labels, position_ids = [], [], []
        for i in members:
            f = features[i]
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            position_ids += range(len(f["input_ids"]))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed


def collate_batch(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad features into ``input_ids``/``attention_mask``/``labels`` tensors of shape [batch, longest]
    (labels padded with -100, so padding carries no loss; ``attention_mask`` is 1 on real tokens).

    Packed rows (features with ``position_ids``, from :func:`pack_features`) also give
    ``position_ids``, restarting at 0 on the padding as if it were one more feature. Such a batch
    must reach the model with ``position_ids``, *without* ``attention_mask`` and with
    ``use_cache=False`` (``token_loss_sum`` in the training loop does so): Transformers then builds
    a causal mask that keeps each feature's attention within itself (``find_packed_sequence_indices``
    in ``transformers/masking_utils.py``, used for eager and sdpa attention only when there is
    neither a 2-D attention mask nor a KV cache); otherwise every token sees the earlier features
    of its row.
    """
    if not features:
        raise ValueError("collate_batch got no features; a batch needs at least one")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    packed = sum("position_ids" in f for f in features)
    if packed not in (0, len(features)):
        raise ValueError(f"{packed} of {len(features)} features have position_ids (packed rows) and the others not; "
                         "collate packed rows and single features in separate batches")
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(features), longest), dtype=torch.long) if packed else None
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n or (packed and len(f["position_ids"]) != n):
            raise ValueError(f"feature {row} has {n} input_ids but {len(f['labels'])} labels"
                             + (f" and {len(f['position_ids'])} position_ids" if packed else "") + "; they must match")
        input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
        if packed:
            position_ids[row, :n] = torch.tensor(f["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(longest - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch
