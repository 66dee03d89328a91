"""Build a small base model offline: BPE tokenizer + Llama-architecture model, pre-trained
on unlabelled text through the same Ray Train job as every fine-tune (method ``full``,
task ``raw_text``).

A randomly initialised base gives LoRA nothing to steer (measured: 0% intent accuracy);
a short language-model pre-training on text of the domain is what makes adapters work.
Real users load hub models instead; this exists so the whole platform runs and is tested
on machines that cannot download anything.

Example::

    lorafleet base build --out work/base --corpus queries.txt --set pretrain.num_epochs=2
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from lorafleet.config.base import StrictModel
from lorafleet.config.train import CheckpointConfig, DistributedConfig, TrackingConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# A minimal chat template so the chat task and /v1/chat/completions work on the tiny base.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '### ' + ('Human' if m['role'] == 'user' else ('System' if m['role'] == 'system' else 'Assistant')) + ': ' + m['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)


class ArchitectureConfig(StrictModel):
    vocab_size: int = Field(4096, ge=300, le=65536, description="BPE vocabulary size (upper bound; a small corpus may give fewer merges).")
    hidden_size: int = Field(128, ge=32, description="Model width.")
    intermediate_size: int = Field(512, ge=32, description="MLP width.")
    num_hidden_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(2, ge=1, description="Query heads.")
    num_key_value_heads: int = Field(1, ge=1, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(512, ge=32, description="Context length.")
    tie_word_embeddings: bool = Field(False, description="Share input embeddings and lm_head.")
    seed: int = Field(0, description="Initialisation seed.")

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
            raise ValueError(f"head dimension hidden_size/num_attention_heads = {head_dim}; vLLM's CPU attention needs one of 32, 64, 80, 96, 112, 128, ... (64 recommended)")
        return self


class PretrainConfig(StrictModel):
    num_epochs: float = Field(4, gt=0, description="Passes over the corpus.")
    max_steps: Optional[int] = Field(None, ge=1, description="Cap on optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (small models from scratch like it high).")
    per_device_batch_size: int = Field(8, ge=1, description="Sequences per worker per step.")
    max_seq_length: int = Field(64, ge=16, description="Packed block length in tokens (short blocks: more optimizer steps per pass over a small corpus).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Warm-up fraction.")


class BaseBuildConfig(StrictModel):
    """What ``lorafleet base build`` does; every field can be set with ``--set``."""

    out: str = Field(description="Output folder: a Transformers model folder (config, safetensors, tokenizer).")
    corpus: list[str] = Field(description="Plain-text files, one example per line.")
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    distributed: DistributedConfig = Field(default_factory=lambda: DistributedConfig(num_workers=2, strategy="ddp"), description="Workers for the pre-training job.")
    checkpoint: CheckpointConfig = Field(default_factory=lambda: CheckpointConfig(every_n_steps=200, keep=1))
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment_name="lorafleet-base"), description="Where the pre-training run is tracked.")
    run_name: Optional[str] = Field(None, description="Ray Train / MLflow run name of the pre-training job. Default: derived from the output folder, corpus and settings, so re-running the same build resumes it and a different build never does.")


def read_corpus(files: list[str]) -> list[str]:
    lines: list[str] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"corpus file not found: {f}")
        lines += [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(lines) < 10:
        raise ValueError(f"the corpus has {len(lines)} non-empty lines; give at least 10 (one example per line)")
    return lines


def train_tokenizer(lines: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: any byte sequence is encodable) wrapped as a Transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    # The tokenizers library draws its own bar (rate, ETA); in a log file it would be redraw noise.
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()),
                            show_progress=sys.stderr.isatty(), length=len(lines))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 10**6
    return tok


def init_model(tokenizer, arch: ArchitectureConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(arch.seed)
    conf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(conf)


def _derived_run_name(cfg: BaseBuildConfig, out: Path, lines: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(str(out).encode())
    h.update(json.dumps([cfg.architecture.model_dump(), cfg.pretrain.model_dump()], sort_keys=True).encode())
    h.update("\n".join(lines).encode())
    return "base-" + re.sub(r"[^A-Za-z0-9._-]", "-", out.name)[:40] + f"-{h.hexdigest()[:10]}"


def build_base(cfg: BaseBuildConfig) -> dict:
    """Tokenizer -> random model -> pre-training job -> ``cfg.out``. Returns the pre-training result."""
    from lorafleet.config.train import DataConfig, FinetuneConfig, ModelConfig, TrainingConfig
    from lorafleet.train import run_finetune

    out = Path(cfg.out).resolve()
    work = out.parent / f".{out.name}.build"
    if work.exists():
        shutil.rmtree(work)
    (work / "init").mkdir(parents=True)
    started = time.perf_counter()
    lines = read_corpus(cfg.corpus)
    log.info("base build 1/3: training a %d-token BPE tokenizer on %d corpus lines", cfg.architecture.vocab_size, len(lines))
    tok = train_tokenizer(lines, cfg.architecture.vocab_size)
    model = init_model(tok, cfg.architecture)
    model.save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    corpus_file = work / "corpus.txt"
    corpus_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tokenizer: %d tokens; model: %d parameters; corpus: %d lines", len(tok), n_params, len(lines))

    p = cfg.pretrain
    ft = FinetuneConfig(
        run_name=cfg.run_name or _derived_run_name(cfg, out, lines),
        method="full",
        model=ModelConfig(name_or_path=str(work / "init"), dtype="float32"),
        data=DataConfig(task="raw_text", path=str(corpus_file), validation_fraction=0.05, max_eval_samples=None),
        training=TrainingConfig(num_epochs=p.num_epochs, max_steps=p.max_steps, learning_rate=p.learning_rate,
                                per_device_batch_size=p.per_device_batch_size, max_seq_length=p.max_seq_length,
                                packing=True, warmup_ratio=p.warmup_ratio, weight_decay=0.01, logging_steps=20,
                                lr_scheduler_type="cosine", generation_metrics=False),
        distributed=cfg.distributed,
        checkpoint=cfg.checkpoint,
        tracking=cfg.tracking.model_copy(update={"register_as": None}),
        output_dir=str(work / "pretrain"),
    )
    log.info("base build 2/3: pre-training (Ray Train run %s; each logging step prints step/total, loss and an ETA)",
             ft.run_name)
    result = run_finetune(ft)
    log.info("base build 3/3: writing %s", out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(result["adapter_path"], out)
    info = {"parameters": n_params, "vocab_size": len(tok), "corpus_lines": len(lines),
            "architecture": cfg.architecture.model_dump(), "pretrain_metrics": result["metrics"],
            "mlflow_run_id": result["mlflow_run_id"]}
    (out / "lorafleet_base.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    from lorafleet.progress import format_duration

    log.info("base build done in %s: %s", format_duration(time.perf_counter() - started), out)
    return info
