"""Configuration of one fine-tuning run (``jobs/finetune.py``).

Field names follow the ecosystem: PEFT (``r``, ``lora_alpha``...), bitsandbytes
(``bnb_4bit_*``), Transformers (``lr_scheduler_type``...), Ray Train (``num_workers``,
``use_gpu``, ``storage_path``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from lorafleet.config.base import DEFAULT_WORK_DIR, WORK_DIR_ENV, StrictModel, ray_working_dir_copy, work_dir_for

DType = Literal["auto", "float32", "bfloat16", "float16"]


def default_work_dir() -> Path:
    """Where embedded state lives (MLflow store, Ray storage, outputs): ``$LORAFLEET_HOME``, else ./lorafleet-work.

    Under ``ray job submit --working-dir`` the current directory is Ray's temporary copy of the
    upload, so there the fallback is ``~/lorafleet-work`` on the node (and a relative
    ``$LORAFLEET_HOME`` is refused); the choice is logged once per process.
    """
    return work_dir_for(os.environ.get(WORK_DIR_ENV), ray_working_dir_copy())


class ModelConfig(StrictModel):
    name_or_path: str = Field(description="Hugging Face hub name (e.g. meta-llama/Llama-3.1-8B) or a local folder with config + tokenizer + weights.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: DType = Field("auto", description="Weight dtype. `auto`: bfloat16 on GPU, float32 on CPU.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repo to run. Off by default; only turn on for repos you trust.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = Field(None, description="Attention kernel; None lets Transformers choose.")


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear`.")
    modules_to_save: Optional[list[str]] = Field(None, description="Extra modules trained in full and saved with the adapter (note: vLLM serves only LoRA weights).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha/sqrt(r).")
    init_lora_weights: Union[bool, Literal["gaussian", "pissa", "olora", "loftq"]] = Field(True, description="PEFT LoRA initialisation. `pissa`/`olora` start from the base's principal directions (they change the base weights while training) and are saved converted to a plain LoRA over the untouched base (rank 2r, lora_alpha 2x: serve with engine.max_lora_rank >= 2r). `loftq` is refused: its adapter only fits a re-quantised base that lorafleet neither saves nor serves.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return v


class QuantizationConfig(StrictModel):
    """bitsandbytes 4-bit settings used when ``method: qlora``."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: DType = Field("auto", description="Dtype matmuls run in. `auto`: bfloat16 on GPU, float32 on CPU.")
    bnb_4bit_quant_storage: Union[DType, Literal["uint8"]] = Field("auto", description="Storage dtype of packed weights. With FSDP it must equal the compute dtype (so FSDP can flatten them with the rest); `auto` does that.")


# The metrics lorafleet computes on generated answers (lorafleet.data.metrics.METRICS), and accepted spellings.
METRIC_NAMES: tuple[str, ...] = ("accuracy", "macro_f1", "exact_match", "rouge_l")
METRIC_ALIASES: dict[str, str] = {"rougeL": "rouge_l", "rouge-l": "rouge_l", "rougel": "rouge_l", "f1_macro": "macro_f1",
                                  "em": "exact_match"}
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CustomTaskConfig(StrictModel):
    """A task defined in the YAML, without code: a prompt template over the file's columns and the column
    to generate (free text) or to classify (a label)."""

    name: str = Field("custom", description="Name of the task in results, tags and predictions.")
    prompt_template: str = Field(description="Python str.format template of the prompt over the data's columns, e.g. `\"Query: {text}\\nIntent:\"` (a column named in braces; `{{`/`}}` for literal braces).")
    completion_column: Optional[str] = Field(None, description="Column whose text the model learns to generate (summaries, answers...). Give this or label_column.")
    label_column: Optional[str] = Field(None, description="Column holding a class label (trained as its words, `card_arrival` -> `card arrival`). Give this or completion_column.")
    labels: Optional[list[str]] = Field(None, description="Closed label set (with label_column); rows with other labels are skipped and counted. Default: the labels seen in training.")
    metric: Union[str, list[str], None] = Field(None, description="Metric(s) computed on generated answers: accuracy, macro_f1, exact_match, rouge_l (alias rougeL). Default: accuracy and macro_f1 with label_column, rouge_l with completion_column.")
    max_new_tokens: Optional[int] = Field(None, ge=1, le=4096, description="Generation budget for evaluation. Default: 16 with label_column, 128 with completion_column.")

    @model_validator(mode="after")
    def _check(self):
        import string

        errors = []
        if not _TASK_NAME.match(self.name):
            errors.append(f"custom_task.name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(self.prompt_template) if n is not None]
        except ValueError as exc:
            names = None
            errors.append(f"custom_task.prompt_template is not a valid template ({exc}); name columns as {{column}} "
                          "and write literal braces as {{ and }}")
        if names is not None:
            bad = [n for n in names if not n.isidentifier()]
            if bad or not names:
                errors.append(f"custom_task.prompt_template must name the data's columns in braces, like {{text}} "
                              f"(got {', '.join(repr(n) for n in bad) or 'no column'})")
        if (self.completion_column is None) == (self.label_column is None):
            errors.append("custom_task needs exactly one of completion_column (generate text) or label_column "
                          "(classify); got " + ("both" if self.completion_column else "neither"))
        if self.labels is not None and self.label_column is None:
            errors.append("custom_task.labels (a closed label set) needs custom_task.label_column")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            errors.append(f"custom_task.labels must be a non-empty list of distinct labels, got {self.labels}")
        unknown = [m for m in self.metric_names() if m not in METRIC_NAMES]
        if unknown:
            errors.append(f"custom_task.metric names {', '.join(repr(m) for m in unknown)}, which lorafleet does not "
                          f"compute; choose from {', '.join(METRIC_NAMES)} (rougeL is rouge_l)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def metric_names(self) -> tuple[str, ...]:
        """The metrics, aliases resolved (default by task type)."""
        if self.metric is None:
            return ("accuracy", "macro_f1") if self.label_column else ("rouge_l",)
        names = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        return tuple(dict.fromkeys(METRIC_ALIASES.get(n, n) for n in names))


class DatasetConfig(StrictModel):
    """One dataset and its task: the whole of ``data`` for a single-task run, one entry of ``data.mixture`` otherwise."""

    task: Optional[str] = Field(None, description="Task from the catalogue (`lorafleet tasks` lists them): classification, banking77, commonsense_qa, dialogsum, chat, raw_text, ... Required unless custom_task is given (then it is custom_task.name).")
    custom_task: Optional[CustomTaskConfig] = Field(None, description="A task defined here instead of in the catalogue: prompt template, completion or label column, labels, metric.")
    path: Optional[str] = Field(None, description="Local CSV/JSONL/JSON/Parquet/TXT file or folder. When unset the task's hub dataset is used.")
    hub_name: Optional[str] = Field(None, description="Override the task's hub dataset name.")
    hub_config: Optional[str] = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Split to train on.")
    validation_path: Optional[str] = Field(None, description="Separate validation file; otherwise a split of the training data.")
    validation_split: Optional[str] = Field(None, description="Hub split to use as validation (e.g. `validation`).")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction held out for validation when no validation split/file is given (80/20 by default).")
    seed: int = Field(42, description="Seed of the deterministic train/validation split.")
    max_train_samples: Optional[int] = Field(None, ge=1, description="Cap on training examples (after the split).")
    max_eval_samples: Optional[int] = Field(200, ge=1, description="Cap on validation examples used for generation metrics (loss uses all).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename map {task_field: column_in_file}, e.g. {text: utterance, label: intent}.")
    labels: Optional[list[str]] = Field(None, description="Closed label set for classification tasks. Rows with other labels are skipped and counted. Default: labels seen in training data (or the task's own list).")
    on_bad_row: Literal["skip", "error"] = Field("skip", description="Rows with missing/empty fields or unknown labels: `skip` (logged and counted) or `error`.")
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "guanaco"] = Field("auto", description="Conversation format of task `chat` data: `openai` (`messages` of role/content, optional per-message `weight: 0`), `sharegpt` (`conversations` of from/value), `alpaca` (instruction/input/output), `prompt_completion`, `guanaco` (`### Human: ... ### Assistant: ...` text). `auto` tells them apart per file by its columns. All are rendered with the base's chat template where it has one.")
    loss_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field("all_assistant_turns", description="Task `chat`: which assistant turns of a conversation carry loss (assistant messages with `weight: 0` never do). Over-long conversations keep their first whole turns.")

    @model_validator(mode="after")
    def _task_and_format(self):
        errors = []
        if self.custom_task is not None:
            if self.task is not None and self.task != self.custom_task.name:
                errors.append(f"data.task ({self.task!r}) and data.custom_task (named {self.custom_task.name!r}) both name "
                              "the task; remove data.task, or set custom_task.name to it")
            if self.labels is not None:
                errors.append(f"data.labels ({self.labels}) with data.custom_task: give the closed label set as custom_task.labels")
            self.__dict__["task"] = self.custom_task.name  # the run's task is the custom one
        elif self.task is None:
            errors.append("data.task is required: a task of the catalogue (`lorafleet tasks` lists them), "
                          "or define one with data.custom_task")
        if self.format != "auto" and self.task != "chat":
            errors.append(f"data.format ({self.format}) reads conversations for task chat, but data.task is "
                          f"{self.task!r}; set data.task: chat, or leave data.format at auto")
        if errors:
            raise ValueError("; ".join(errors))
        return self


class MixtureDataset(DatasetConfig):
    """One dataset of a task mixture: a dataset with its task, its share of the training draws and its name in metrics."""

    weight: float = Field(1.0, gt=0, description="Share of the training examples drawn from this dataset, relative to the other datasets' weights (normalised over the mixture). A dataset drawn more often than it has examples repeats them, each once before any twice.")
    name: Optional[str] = Field(None, description="Name of this dataset in metrics (`eval/<name>/accuracy`...), stats and predictions. Default: its task's name.")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v is not None and not _TASK_NAME.match(v):
            raise ValueError(f"mixture name {v!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    def metric_prefix(self) -> str:
        return self.name or self.task


# Fields a mixture's datasets take from ``data`` when they do not set them (the rest is each dataset's own).
MIXTURE_SHARED_FIELDS = ("split", "validation_fraction", "seed", "max_eval_samples", "on_bad_row", "loss_on")


class DataConfig(DatasetConfig):
    mixture: Optional[list[MixtureDataset]] = Field(None, description="Several datasets trained into one adapter, each with its own task, source, 80/20 split (or validation file), limits and `weight` (its share of the training draws). Validation reports each dataset's metrics as `eval/<name>/<metric>` plus `eval_loss` over all and `eval_score`, the weighted mean of each dataset's first metric. data's split, validation_fraction, seed, max_eval_samples, on_bad_row and loss_on apply to every dataset that does not set its own; the other data fields belong in the datasets.")
    mixture_size: Optional[int] = Field(None, ge=1, description="Training examples drawn per epoch from the mixture. Default: the datasets' training examples summed.")

    @model_validator(mode="after")
    def _task_and_format(self):
        if self.mixture is None:
            if self.mixture_size is not None:
                raise ValueError("data.mixture_size is the size of a task mixture; set data.mixture, or remove mixture_size")
            return DatasetConfig._task_and_format(self)
        errors = []
        # Set to something other than its default (a dumped config carries every field, defaults included).
        own = sorted(k for k, f in DatasetConfig.model_fields.items()
                     if k not in MIXTURE_SHARED_FIELDS and getattr(self, k) != f.get_default(call_default_factory=True))
        if own:
            errors.append(f"data.{', data.'.join(own)} belong(s) to each dataset of data.mixture, not to data itself; "
                          "move them into the mixture's entries")
        if not self.mixture:
            errors.append("data.mixture is empty: give at least one dataset (task, path or hub_name, weight)")
        names = [d.metric_prefix() for d in self.mixture]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            errors.append(f"data.mixture names {twice} more than once; give each dataset of the same task its own `name`")
        if errors:
            raise ValueError("; ".join(errors))
        shared = {k: getattr(self, k) for k in MIXTURE_SHARED_FIELDS if k in self.model_fields_set}
        self.__dict__["mixture"] = [d.model_copy(update={k: v for k, v in shared.items() if k not in d.model_fields_set})
                                    for d in self.mixture]
        return self

    def datasets(self) -> list[MixtureDataset]:
        """The datasets of the run: the mixture's, or ``data`` itself as the one dataset (weight 1)."""
        if self.mixture is not None:
            return list(self.mixture)
        return [MixtureDataset.model_validate(self.model_dump(exclude={"mixture", "mixture_size"}))]

    def run_task_name(self) -> str:
        """The run's task in tags and results: the task, or the mixture's dataset names joined by '+'."""
        return self.task if self.mixture is None else "+".join(d.metric_prefix() for d in self.mixture)


class TrainingConfig(StrictModel):
    num_epochs: float = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"] = Field("cosine", description="Transformers scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up (ignored when warmup_steps > 0).")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps.")
    per_device_batch_size: int = Field(8, ge=1, description="Examples per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Compute dtype for forward/backward (FSDP2: its MixedPrecisionPolicy; DDP: autocast; DeepSpeed: its bf16/fp16 section). bf16/fp16 need a GPU; prefer bf16 (fp16 runs with a gradient scaler).")
    torch_compile: bool = Field(False, description="torch.compile each decoder layer (FSDP2, DDP and single-process runs; not with DeepSpeed).")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field("adamw_torch", description="Optimizer; 8-bit variants come from bitsandbytes (GPU).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    max_seq_length: int = Field(256, ge=8, description="Token limit per example. Longer examples are skipped and counted (never silently truncated into a wrong label).")
    packing: bool = Field(False, description="Less padding: whole training examples share rows of up to max_seq_length tokens (best-fit decreasing by length), each with its own labels, position ids restarting at 0 and attention kept within it (eager or sdpa attention; not flash_attention_2). per_device_batch_size then counts rows, so an epoch has fewer steps. Validation stays unpacked. Task raw_text instead concatenates all texts and cuts full blocks (as in pre-training; documents share context).")
    seed: int = Field(42, description="Seed for init, shuffling and dropout.")
    logging_steps: int = Field(10, ge=1, description="Report train metrics every N optimizer steps.")
    eval_steps: Optional[int] = Field(None, ge=1, description="Evaluate every N steps (plus at each epoch end).")
    eval_batch_size: int = Field(16, ge=1, description="Batch size for validation loss and generation.")
    generation_metrics: bool = Field(True, description="Compute task metrics by generating on the validation split (else loss only).")


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Where optimizer states live.")
    offload_param: Literal["none", "cpu", "nvme"] = Field("none", description="Where parameters live (stage 3 only).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw keys merged into the DeepSpeed JSON config.")

    @model_validator(mode="after")
    def _offload_param_needs_stage3(self):
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param ({self.offload_param}) needs zero_stage 3 (got {self.zero_stage})")
        return self


class DistributedConfig(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend. False: CPU workers, gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field("fsdp", description="`fsdp`: FSDP2 fully_shard per decoder layer then the model (CPU and GPU); `ddp`: replicated; `deepspeed`: ZeRO (GPU).")
    fsdp_reshard_after_forward: bool = Field(True, description="FSDP2: free gathered params after forward (ZeRO-3 like) vs keep them (ZeRO-2 like).")
    fsdp_cpu_offload: bool = Field(False, description="FSDP2: keep sharded params on CPU (GPU only).")
    deepspeed: Optional[DeepSpeedConfig] = Field(None, description="DeepSpeed settings, required when strategy is deepspeed.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="Ray placement group strategy for the workers: PACK fills one node first; SPREAD puts them on different nodes where it can (STRICT_*: or not at all). Whatever the strategy, a lost node that held a worker restarts the group, which resumes from the newest complete checkpoint once the resources are back (checkpoint.max_failures counts it).")
    worker_startup_timeout_s: float = Field(180, gt=0, description="How long Ray Train waits for the worker group to start.")


class CheckpointConfig(StrictModel):
    every_n_steps: int = Field(50, ge=1, description="Save a sharded checkpoint every N optimizer steps (and at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept (Ray Train `num_to_keep`). Keep at least 2: a resume skips a corrupt or half-written latest checkpoint for the previous complete one.")
    storage_path: Optional[str] = Field(None, description="Ray Train storage (local path, NFS, s3://, gs://). Default: <work dir>/ray_results. Must be shared by all nodes on a cluster.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts allowed (Ray `FailureConfig`); -1 is unlimited.")


class TrackingConfig(StrictModel):
    mlflow_tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI. Default: sqlite:///<work dir>/mlflow.db (embedded). A cluster uses an `mlflow server` URL.")
    mlflow_artifact_location: Optional[str] = Field(None, description="Artifact root for a new experiment (default: <work dir>/mlartifacts with the embedded store).")
    experiment_name: str = Field("lorafleet", description="MLflow experiment.")
    register_as: Optional[str] = Field(None, description="Registered model name for the adapter; null skips registration.")
    enabled: bool = Field(True, description="Log to MLflow at all.")
    wandb: Literal["off", "online", "offline"] = Field("off", description="Weights & Biases: off, online (needs WANDB_API_KEY), offline (writes to <output_dir>/wandb).")
    wandb_project: str = Field("lorafleet", description="W&B project.")
    wandb_entity: Optional[str] = Field(None, description="W&B entity (team).")
    wandb_group: Optional[str] = Field(None, description="W&B group (sweeps set it).")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the MLflow run and registered version.")


class HubPushConfig(StrictModel):
    repo_id: Optional[str] = Field(None, description="Push the adapter to this hub repo after training (needs network and HF_TOKEN; not testable offline).")
    private: bool = Field(True, description="Create the hub repo as private.")


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class FinetuneConfig(StrictModel):
    """One fine-tuning run. Load with ``load_config(FinetuneConfig, path, overrides)``."""

    run_name: str = Field("finetune", description="Ray Train run name. Re-running the same name resumes from its latest checkpoint.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="`lora`: PEFT LoRA on a frozen base; `qlora`: LoRA on a 4-bit (NF4/FP4) base; `full`: train every weight (used to pre-train the tiny base).")
    model: ModelConfig
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA hyperparameters (methods lora and qlora).")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="4-bit settings (method qlora).")
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    push_to_hub: HubPushConfig = Field(default_factory=HubPushConfig)
    output_dir: Optional[str] = Field(None, description="Where adapter/, result.json and plots go. Default: <work dir>/outputs/<run_name>.")

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not _RUN_NAME.match(v):
            raise ValueError("run_name must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _cross_field(self):
        errors = []
        d, t = self.distributed, self.training
        if d.strategy == "deepspeed" and not d.use_gpu:
            errors.append("distributed.strategy is 'deepspeed' but distributed.use_gpu is false: DeepSpeed runs on GPUs only; use 'fsdp' or 'ddp' on CPU")
        if d.strategy == "deepspeed" and d.deepspeed is None:
            errors.append("distributed.strategy is 'deepspeed' but distributed.deepspeed is not set (give at least {zero_stage: 2})")
        if d.fsdp_cpu_offload and not d.use_gpu:
            errors.append("distributed.fsdp_cpu_offload (true) only makes sense with distributed.use_gpu (false)")
        if t.mixed_precision != "no" and not d.use_gpu:
            errors.append(f"training.mixed_precision ({t.mixed_precision}) needs distributed.use_gpu: CPU runs use float32 (set mixed_precision: no)")
        if t.optimizer in ("adamw_8bit", "paged_adamw_8bit") and not d.use_gpu:
            errors.append(f"training.optimizer ({t.optimizer}) needs a GPU; use adamw_torch on CPU")
        if self.method == "qlora" and d.strategy == "deepspeed" and d.deepspeed and d.deepspeed.zero_stage == 3:
            errors.append("method qlora with DeepSpeed ZeRO-3 is not supported; use strategy fsdp (FSDP2 shards NF4 weights) or zero_stage <= 2")
        init = self.lora.init_lora_weights
        if self.method != "full" and init == "loftq":
            errors.append("lora.init_lora_weights 'loftq' is not supported: LoftQ replaces the base weights with their "
                          "quantised-then-dequantised form, so its adapter only fits that modified base, which lorafleet "
                          "neither saves nor serves (and PEFT's LoftQ needs the full-precision base on a CUDA GPU, not a "
                          "4-bit one). Use true (default), gaussian, pissa or olora")
        if self.method == "qlora" and init in ("pissa", "olora"):
            errors.append(f"lora.init_lora_weights {init!r} with method qlora is not supported: {init} subtracts the "
                          "adapter's start from the base weights, and on a 4-bit base the saved plain-LoRA adapter "
                          "(quantised W_res + trained delta) would no longer equal the trained model over the original "
                          f"quantised base; use method lora with {init}, or init_lora_weights true with qlora")
        if t.torch_compile and d.strategy == "deepspeed":
            errors.append("training.torch_compile (true) is not applied under distributed.strategy 'deepspeed' (the "
                          "engine wraps the model after lorafleet would compile it, and ZeRO's parameter hooks are not "
                          "verified with compiled layers here); use strategy fsdp or ddp to compile, or set torch_compile: false")
        if t.packing and self.model.attn_implementation == "flash_attention_2" and self.data.task != "raw_text":
            # Transformers' flash path takes example boundaries from position_ids only for one flattened
            # row (modeling_flash_attention_utils._is_packed_sequence needs batch size 1); for a batch of
            # packed rows it would attend across the examples of a row without a word.
            errors.append("training.packing (true) with model.attn_implementation flash_attention_2: packed rows would "
                          "attend across examples there; use attn_implementation sdpa or eager (or leave it unset), "
                          "or set packing: false")
        if self.method == "full" and self.tracking.register_as and self.lora.modules_to_save:
            errors.append("lora.modules_to_save is meaningless with method full")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).resolve() if self.output_dir else default_work_dir() / "outputs" / self.run_name

    def resolved_storage_path(self) -> str:
        sp = self.checkpoint.storage_path
        if sp and "://" in sp:
            return sp
        return str(Path(sp).resolve() if sp else default_work_dir() / "ray_results")
