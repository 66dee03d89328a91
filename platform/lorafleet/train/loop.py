"""The Ray Train worker recipe: one function that every worker runs.

Reads top to bottom like torchtune's recipes / Ray Train's FSDP2 guide: load data and
model, wrap for data parallelism, resume from the latest complete checkpoint, train with gradient
accumulation and a Transformers LR scheduler, and at fixed step intervals log, evaluate
(loss + generation metrics), checkpoint. Everything that decides *when* to do a
collective depends only on the step count, so all ranks stay in lock-step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lorafleet.config.train import FinetuneConfig
from lorafleet.data.tokenize import IGNORE_INDEX
from lorafleet.train.checkpoint import (ADAPTER_DIR, TrainState, choose_resume_checkpoint, export_model,
                                        load_training_checkpoint, save_training_checkpoint, write_manifest,
                                        write_train_state)
from lorafleet.train.model import count_parameters, load_base_model, load_tokenizer, wrap_peft
from lorafleet.train.parallel import apply_ddp, apply_deepspeed, apply_fsdp2, decoder_layers, load_fsdp2_model, unwrap

log = logging.getLogger(__name__)
# Its own name, so a deployment can route or silence the per-step line apart from other logs.
progress_log = logging.getLogger("lorafleet.train.progress")


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to ``TorchTrainer``. ``loop_config`` = {"config": FinetuneConfig dump, "tracking": {...}}."""
    import ray.train
    import ray.train.torch

    from lorafleet.data import collate_batch, pack_features, tokenize_examples
    from lorafleet.data.mixture import load_training_data, training_features

    cfg = FinetuneConfig.model_validate(loop_config["config"])
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)

    # ---- data (every rank builds the same deterministic split; each reads its shard) ----
    tokenizer = load_tokenizer(cfg.model)
    data = load_training_data(cfg.data, tokenizer=tokenizer)
    train_feats, train_stats = training_features(data, tokenizer, t.max_seq_length, t.packing, seed=t.seed)
    if t.packing:
        # Whole examples (a mixture's, once drawn) share rows; validation stays unpacked.
        train_feats = pack_features(train_feats, t.max_seq_length)
        train_stats["packed_rows"] = len(train_feats)
    val_feats = [tokenize_examples(p.data.validation, tokenizer, t.max_seq_length, p.task, False)[0] for p in data.parts]
    if not train_feats:
        raise ValueError(f"no training example fits training.max_seq_length={t.max_seq_length} ({train_stats}); raise it")
    pad_id = tokenizer.pad_token_id

    sampler = torch.utils.data.DistributedSampler(train_feats, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
    micro_per_epoch = math.ceil(len(sampler) / t.per_device_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)

    # ---- model ----
    trainable_only = cfg.method != "full"
    strategy = cfg.distributed.strategy
    # FSDP2: built on the meta device and sharded before any weight is read (None: not possible, load in full).
    model = load_fsdp2_model(cfg, device) if strategy == "fsdp" and dist.is_initialized() else None
    if model is None:
        model = wrap_peft(load_base_model(cfg, device), cfg)
        if strategy == "fsdp" and dist.is_initialized():
            model = apply_fsdp2(model, cfg, device)  # compiles each decoder layer before sharding it
        elif strategy == "ddp" and world > 1:
            model = apply_ddp(model, cfg, device)  # compiles each decoder layer before wrapping
        elif t.torch_compile and strategy != "deepspeed":
            # Unwrapped (one process without a process group): compile here, or the option would do nothing.
            for layer in decoder_layers(model):
                layer.compile()
    optimizer = build_optimizer(model, cfg)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    engine = None
    if strategy == "deepspeed":
        engine, optimizer, scheduler = apply_deepspeed(model, optimizer, scheduler, cfg, world)
    n_trainable, n_local = count_parameters(model)

    # ---- resume ----
    state = TrainState()
    # Ray's latest may be half-written or corrupt, or missing while a complete one is in the run's storage.
    run_uri = cfg.checkpoint.storage_path.rstrip("/") + "/" + cfg.run_name if cfg.checkpoint.storage_path else None
    checkpoint = choose_resume_checkpoint(ray.train.get_checkpoint(), run_uri)
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = _load(ckpt_dir, engine, model, optimizer, scheduler, trainable_only)
        state.resumed_from_step = state.global_step
        log.warning("rank %d resumed from step %d (epoch %d, micro-batch %d)", rank, state.global_step, state.epoch, state.micro_step_in_epoch)

    logger = _make_logger(loop_config.get("tracking"), rank)
    autocast = _autocast(cfg, device)
    evaluator = _Evaluator(cfg, data, val_feats, tokenizer, pad_id, device, world, rank)
    base_metrics = {"params/trainable_local": n_trainable, "params/local": n_local, "world_size": world,
                    "steps_total": total_steps, "data/train_examples": len(train_feats), "data/val_examples": sum(map(len, val_feats)),
                    **{f"data/{k}": v for k, v in train_stats.items()}}

    # ---- train ----
    scaler = _grad_scaler(cfg, device, engine)
    # Data-parallel wrappers average gradients over ranks; the token-normalised loss wants their sum.
    averaged_over = world if (engine is not None or (strategy == "fsdp" and dist.is_initialized())
                              or (strategy == "ddp" and world > 1)) else 1
    model.train()
    window_loss, window_targets, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    progress = TrainingProgress(total_steps, state.global_step)
    while state.global_step < total_steps:
        sampler.set_epoch(state.epoch)
        order = list(sampler)
        batches = [order[i : i + t.per_device_batch_size] for i in range(0, len(order), t.per_device_batch_size)]
        micro = state.micro_step_in_epoch
        while micro < len(batches) and state.global_step < total_steps:
            group = batches[micro : micro + t.gradient_accumulation_steps]
            micro_batches = [collate_batch([train_feats[j] for j in idx], pad_id) for idx in group]
            loss_sum, targets, tokens = backward_token_normalised(
                engine or model, micro_batches, device, averaged_over=averaged_over,
                no_sync=lambda enabled: _grad_sync(model, strategy, enabled), autocast=autocast, scaler=scaler, engine=engine)
            window_loss += loss_sum
            window_targets += targets
            window_tokens += tokens
            if not engine:
                optimizer_step(model, optimizer, scheduler, t.max_grad_norm, scaler)
            micro += len(group)
            state.global_step += 1
            state.micro_step_in_epoch = micro
            if micro >= len(batches):
                state.epoch += 1
                state.micro_step_in_epoch = 0
            step = state.global_step

            final = step >= total_steps
            epoch_end = state.micro_step_in_epoch == 0
            do_log = step % t.logging_steps == 0 or final
            do_eval = final or epoch_end or bool(t.eval_steps and step % t.eval_steps == 0)
            do_ckpt = final or step % cfg.checkpoint.every_n_steps == 0
            if not (do_log or do_eval or do_ckpt):
                continue

            metrics: dict = {"step": step, "epoch": step / steps_per_epoch, "lr": scheduler.get_last_lr()[0]}
            if window_tokens:
                elapsed = time.perf_counter() - window_start
                loss_sum, targets, tokens = _all_reduce_sum([window_loss, float(window_targets), float(window_tokens)], device)
                state.tokens_seen += int(tokens)
                # Per target token, over every rank and micro-batch since the last log: the quantity optimised.
                metrics.update({"train_loss": loss_sum / max(targets, 1.0), "tokens_per_s": tokens / max(elapsed, 1e-9),
                                "tokens_seen": state.tokens_seen, "peak_memory_mb": _peak_memory_mb(device)})
                window_loss, window_targets, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if do_eval:
                metrics.update(evaluator.run(model, engine, generation=t.generation_metrics))
                window_start = time.perf_counter()  # keep eval time out of tokens/s
            if do_log and rank == 0:
                progress.log(step, metrics)
            if state.resumed_from_step is not None:
                metrics["resumed_from_step"] = state.resumed_from_step
            if final:
                metrics.update(base_metrics)
            state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if logger:
                logger.log({k: v for k, v in metrics.items() if k not in ("step",)}, step=step)
                if final:
                    # Flush before the final checkpoint, so that what MLflow never got (server down to
                    # the end) is recorded in it and reaches result.json through the driver.
                    report = logger.close()
                    state.tracking = {"unsent_metrics": report["pending"], "errors": report["errors"]}
            if do_eval or do_ckpt:
                _report(metrics, cfg, rank, engine, model, optimizer, scheduler, state, tokenizer, trainable_only, do_ckpt, final)
            # A logging-only step needs no ray.train.report (a barrier of every rank and a round trip to
            # the Train controller): MLflow/W&B get the metrics from rank 0's logger, the loss curve
            # from the history.
            model.train()

    if logger:
        logger.close()  # already closed at the final step, unless this attempt resumed a finished run


# ---------------------------------------------------------------- one optimizer step

def target_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a batch: labels other than -100 after the causal shift (position 0 never does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropy over the target tokens of ``batch``.

    Computed here from the logits, as Transformers' ``ForCausalLMLoss`` does (float32 logits,
    shift by one), so that normalising by a token count of our choosing does not depend on a
    model's forward accepting ``num_items_in_batch``. A packed batch (``position_ids``, see
    ``collate_batch``) goes in without its attention mask.
    """
    if "position_ids" in batch:
        # Packed rows: Transformers keeps attention within each example only without a 2-D attention
        # mask and without a KV cache (masking_utils._preprocess_mask_arguments); the cache is on by
        # default (config.use_cache), even in training. Otherwise examples would see each other.
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def backward_token_normalised(model, micro_batches: list[dict], device, *, averaged_over: int = 1,
                              no_sync=None, autocast=None, scaler=None, engine=None) -> tuple[float, int, int]:
    """Forward and backward every micro-batch of one optimizer step; gradients end up as

        sum of token losses over all micro-batches of all ranks / target tokens of all of them

    (Transformers' ``num_items_in_batch``, torchtune's token-scaled gradients): every target
    token weighs the same, whatever micro-batch or rank it is in. A mean per micro-batch would
    weigh tokens of short micro-batches (and of ranks with fewer tokens) more. The target count
    is all-reduced once per step. ``averaged_over`` is the number of ranks the data-parallel
    wrapper (DDP, FSDP2, DeepSpeed) averages gradients over: the loss is multiplied by it so the
    average becomes the sum. Returns (local loss sum, local target tokens, local tokens) for logging.
    """
    local_targets = sum(target_token_count(b["labels"]) for b in micro_batches)
    global_targets = _all_reduce_sum([float(local_targets)], device)[0]
    scale = averaged_over / max(global_targets, 1.0)
    if engine is not None:
        # engine.backward divides by its gradient_accumulation_steps; our scale already averages.
        scale *= engine.gradient_accumulation_steps()
    loss_sum = 0.0
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with (no_sync(last) if no_sync else contextlib.nullcontext()), (autocast or contextlib.nullcontext()):
            summed = token_loss_sum(model, batch)
        loss = summed * scale
        if engine is not None:
            if hasattr(engine, "set_gradient_accumulation_boundary"):
                # An epoch's last group may be shorter than gradient_accumulation_steps: step where we say.
                engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss)
            engine.step()
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        loss_sum += summed.item()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, local_targets, tokens


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float | None, scaler=None) -> None:
    """Clip, step (through the fp16 gradient scaler when there is one), advance the LR schedule, zero grads."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when a gradient is inf/nan
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _grad_scaler(cfg: FinetuneConfig, device, engine):
    """A loss scaler for fp16: fp16's narrow exponent range underflows small gradients to zero without one.

    bf16 has fp32's range and needs none; DeepSpeed scales with its own (``fp16.enabled``). With
    FSDP2 the ``ShardedGradScaler`` all-reduces the inf/nan check, so every rank skips the same
    steps. Its scale is not checkpointed: after a resume it re-calibrates within a few steps.
    """
    if cfg.training.mixed_precision != "fp16" or engine is not None:
        return None
    if dist.is_initialized() and cfg.distributed.strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


class TrainingProgress:
    """The one progress line per logging step (rank 0), with an ETA from this attempt's pace.

    It goes through ``logging``, not ``print``: Ray Train patches ``print`` in workers to log
    through the root logger *and*, since Ray replaces a worker's ``sys.stdout``, also to write
    to it (ray/train/v2/_internal/logging/patch_print.py), so every printed line reached the
    job's console twice.
    """

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()

    def line(self, step: int, metrics: dict, now: float | None = None) -> str:
        from lorafleet.progress import eta_seconds, format_duration

        elapsed = (now if now is not None else time.perf_counter()) - self.started
        eta = eta_seconds(step - self.start_step, self.total_steps - self.start_step, elapsed)
        text = (f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) epoch {metrics.get('epoch', 0.0):.2f} "
                f"loss {metrics.get('train_loss', float('nan')):.4f} lr {metrics.get('lr', float('nan')):.3g} "
                f"{metrics.get('tokens_per_s', 0.0):.0f} tokens/s")
        if "eval_loss" in metrics:
            text += f" eval_loss {metrics['eval_loss']:.4f}"
        return text + f" elapsed {format_duration(elapsed)} eta {format_duration(eta)}"

    def log(self, step: int, metrics: dict) -> None:
        progress_log.info(self.line(step, metrics))


def build_optimizer(model, cfg: FinetuneConfig):
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check lora.target_modules and method")
    if t.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=0.9, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _report(metrics, cfg, rank, engine, model, optimizer, scheduler, state, tokenizer, trainable_only, do_ckpt, final):
    """``ray.train.report`` on every rank (it is a barrier), with a checkpoint when due."""
    import ray.train

    if not do_ckpt:
        ray.train.report(metrics)
        return
    state.finished = final
    with tempfile.TemporaryDirectory(prefix="lorafleet-ckpt-") as tmp:
        if engine:
            engine.save_checkpoint(str(Path(tmp) / "deepspeed"))
            write_train_state(tmp, state, scheduler)
        else:
            save_training_checkpoint(tmp, model, optimizer, scheduler, state, trainable_only)
        if final:
            from lorafleet.data.mixture import datasets_of

            export_model(Path(tmp) / ADAPTER_DIR, engine.module if engine else model, tokenizer, cfg.method,
                         datasets_of(cfg.data).prompt_format())
        write_manifest(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _load(ckpt_dir, engine, model, optimizer, scheduler, trainable_only) -> TrainState:
    if engine:
        from lorafleet.train.checkpoint import read_train_state

        engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"))
        return read_train_state(ckpt_dir)
    return load_training_checkpoint(ckpt_dir, model, optimizer, scheduler, trainable_only)


def _grad_sync(model, strategy: str, enabled: bool):
    """Skip gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation group."""
    if enabled:
        return contextlib.nullcontext()
    if strategy == "ddp" and hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    lm = getattr(model, "get_base_model", lambda: None)()
    if lm is not None and hasattr(lm, "set_requires_gradient_sync"):
        return _fsdp_no_sync(lm)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(fsdp_module):
    fsdp_module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        fsdp_module.set_requires_gradient_sync(True)


def _autocast(cfg: FinetuneConfig, device):
    mp = cfg.training.mixed_precision
    if mp == "no" or cfg.distributed.strategy != "ddp":
        # FSDP2 casts through its MixedPrecisionPolicy; DeepSpeed through its own config.
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        local = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if dist.is_initialized():
        t = torch.tensor([local], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        local = t.item()
    return local


def _make_logger(tracking: dict | None, rank: int):
    """Rank 0 logs step metrics into the driver's MLflow run (and W&B); other ranks log nothing."""
    if rank != 0 or not tracking or not tracking.get("run_id"):
        return None
    from lorafleet.tracking import MetricsLogger, WandbSettings

    # The logger retries on its own (backoff capped at 30 s, every 0.5 s while flushing at the end).
    # MLflow's HTTP retries (7, backoff up to 120 s) would hold its sender inside one call for minutes,
    # blind to a server that is back. The logger is the only MLflow user in a training worker.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    wandb = WandbSettings(**tracking["wandb"]) if tracking.get("wandb") else None
    try:
        logger = MetricsLogger(tracking["tracking_uri"], tracking["run_id"], wandb=wandb)
        logger.prepare()
        return logger
    except Exception:  # tracking must never stop training
        log.exception("could not start the metrics logger; training continues without step metrics")
        return None


class _Evaluator:
    """Validation loss/perplexity on all validation examples, and task metrics by generation, per dataset of the
    run: a single task's as ``eval_<metric>``, a mixture's as ``eval/<name>/<metric>`` plus ``eval_score``."""

    def __init__(self, cfg, data, val_feats, tokenizer, pad_id, device, world, rank):
        self.cfg, self.data, self.val_feats, self.tokenizer = cfg, data, val_feats, tokenizer
        self.pad_id, self.device, self.world, self.rank = pad_id, device, world, rank
        limit = cfg.data.max_eval_samples
        # A mixture's datasets carry their own limit (data's unless set).
        limits = [d.max_eval_samples for d in cfg.data.datasets()] if data.mixture else [limit]
        self.gen_examples = [p.data.validation[:n] if n else p.data.validation for p, n in zip(data.parts, limits)]

    @torch.no_grad()
    def run(self, model, engine, generation: bool) -> dict:
        model.eval()
        sums = [x for feats in self.val_feats for x in self._loss_sum(model, engine, feats)]
        sums = _all_reduce_sum(sums, self.device)
        metrics: dict = {}
        total, tokens = sum(sums[0::2]), sum(sums[1::2])
        if tokens:
            metrics["eval_loss"] = total / tokens
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        for part, examples, part_sum, part_tokens in zip(self.data.parts, self.gen_examples, sums[0::2], sums[1::2]):
            prefix = f"eval/{part.name}/" if self.data.mixture else "eval_"
            if self.data.mixture and part_tokens:
                metrics[prefix + "loss"] = part_sum / part_tokens
            if generation and part.task.generation_metrics and examples:
                scores = self._generation_metrics(model, engine, part.task, examples)
                metrics.update({prefix + k: v for k, v in scores.items()})
        if self.data.mixture:
            from lorafleet.data.mixture import SCORE_METRIC, mixture_score

            score = mixture_score(self.data.parts, metrics)
            if score is not None:
                metrics[SCORE_METRIC] = score
        return metrics

    def _loss_sum(self, model, engine, feats) -> tuple[float, float]:
        """(summed token loss, target tokens) of this rank's shard of ``feats``."""
        from lorafleet.data import collate_batch

        bs = self.cfg.training.eval_batch_size
        # Equal shard sizes on every rank: FSDP needs every rank in every forward.
        per_rank = math.ceil(len(feats) / self.world) if feats else 0
        shard = feats[self.rank * per_rank : (self.rank + 1) * per_rank]
        loss_sum = tokens = 0.0
        for i in range(0, per_rank, bs):
            chunk = shard[i : i + bs]
            real = len(chunk)
            chunk = chunk + [feats[0]] * (min(bs, per_rank - i) - real)
            batch = {k: v.to(self.device) for k, v in collate_batch(chunk, self.pad_id).items()}
            out = (engine or model)(**batch)
            if real:
                # Recompute the sum over the real rows only.
                logits = out.logits[:real, :-1].float()
                labels = batch["labels"][:real, 1:]
                loss_sum += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum").item()
                tokens += float((labels != -100).sum())
        return loss_sum, tokens

    def _generation_metrics(self, model, engine, task, ex) -> dict:
        from lorafleet.data import clean_prediction, compute_metrics
        from lorafleet.evaluate import generate_with_progress

        per_rank = math.ceil(len(ex) / self.world)
        mine = ex[self.rank * per_rank : (self.rank + 1) * per_rank]
        padded = mine + [ex[0]] * (per_rank - len(mine))
        sharded = self.world > 1 and self.cfg.distributed.strategy in ("fsdp", "deepspeed")
        gen_model = engine.module if engine else unwrap(model)
        outputs = generate_with_progress(gen_model, self.tokenizer, [e.prompt for e in padded], task.max_new_tokens,
                                         batch_size=self.cfg.training.eval_batch_size, synced_gpus=sharded,
                                         show=self.rank == 0, desc=f"eval generation {task.name}",
                                         add_bos=[e.bos for e in padded])[: len(mine)]
        if dist.is_initialized():
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        outputs = [clean_prediction(task, o) for o in outputs]
        return compute_metrics(task, outputs, [e.reference for e in ex])
