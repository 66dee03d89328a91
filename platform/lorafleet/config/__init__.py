"""Configuration models (pydantic, ``extra="forbid"``) and the YAML/``--set`` loader."""

from lorafleet.config.base import ConfigError, StrictModel, apply_overrides, dump_config, flatten, load_config, validate_config
from lorafleet.config.train import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    FinetuneConfig,
    LoraSettings,
    ModelConfig,
    QuantizationConfig,
    TrackingConfig,
    TrainingConfig,
    default_work_dir,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "FinetuneConfig", "LoraSettings",
    "ModelConfig", "QuantizationConfig", "StrictModel", "TrackingConfig", "TrainingConfig", "apply_overrides",
    "default_work_dir", "dump_config", "flatten", "load_config", "validate_config",
]
