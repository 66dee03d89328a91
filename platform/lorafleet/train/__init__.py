"""Training: model loading (dtype, NF4, PEFT), the Ray Train worker recipe, checkpoints, TorchTrainer assembly."""

from lorafleet.train.trainer import run_finetune

__all__ = ["run_finetune"]
