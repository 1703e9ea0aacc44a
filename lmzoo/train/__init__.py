"""Fine-tuning: data, the shared loop (loop), one entry point for every method (run: full,
LoRA, P-tuning v2, prompt tuning), several processes (distributed), the demo, compare-peft and
the small tasks they train on (tasks/)."""

from .data import DataReport, Example, load_examples, split
from .loop import TrainConfig, Trainer
from .run import METHODS, FinetuneResult, exact_match, finetune

__all__ = ["DataReport", "Example", "load_examples", "split", "TrainConfig", "Trainer", "METHODS",
           "FinetuneResult", "finetune", "exact_match"]
