"""Fine-tuning: data, the shared loop, and the methods (full, LoRA; P-tuning v2 next)."""

from .data import DataReport, Example, load_examples, split
from .loop import TrainConfig, Trainer
from .run import METHODS, FinetuneResult, exact_match, finetune

__all__ = ["DataReport", "Example", "load_examples", "split", "TrainConfig", "Trainer", "METHODS",
           "FinetuneResult", "finetune", "exact_match"]
