"""`lmzoo demo`, the main job of `make demo`: teach the embedded model a task it fails.

1. the base model's answers on a few held-out examples;
2. LoRA fine-tuning on the embedded date task, with a progress bar;
3. the adapted model's answers to the same examples;
4. held-out exact match before and after;
5. where the loss curve was saved.
"""

from __future__ import annotations

import os
import time

import torch

from ..formats.checkpoint import load
from ..peft import LoraConfig
from . import TrainConfig, exact_match, finetune
from .data import load_examples
from .tasks import dates

SHOWN = 4


def show_answers(title: str, pairs, sentences) -> None:
    print(f"\n{title}")
    for (expected, got), sentence in list(zip(pairs, sentences, strict=True))[:SHOWN]:
        mark = "ok " if got.strip() == expected.strip() else "no "
        print(f"  [{mark}] {sentence}\n        expected {expected!r}, got {got.strip()[:60]!r}")


def run(out_dir: str = "out/demo", *, steps: int = 40, n_test: int = 60, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    train_path, test_path = dates.write(os.path.join(out_dir, "data"), n_train=2000, n_test=n_test, seed=seed)
    print(f"The task: {dates.INSTRUCTION.strip()}\n"
          f"Data: {train_path} (training), {test_path} (held out; no sentence appears in both)")
    model, tok = load()
    held_out = load_examples(test_path, tok, model.config.max_seq_len)
    sentences = [r["messages"][0]["content"].split("\n", 1)[1] for r in _records(test_path)]

    t0 = time.perf_counter()
    before, before_pairs = exact_match(model, tok, held_out, max_new_tokens=12, batch_size=20)
    show_answers("Before fine-tuning (base SmolLM2-135M-Instruct):", before_pairs, sentences)

    print(f"\nFine-tuning with LoRA (r=8 on every linear layer) for {steps} steps of 8 examples:")
    lora = LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    train = TrainConfig(steps=steps, lr=3e-3, batch_size=8, warmup_steps=4, seed=seed)
    result = finetune(model, tok, train_path, os.path.join(out_dir, "lora"), method="lora", lora=lora, train=train,
                      base_name="SmolLM2-135M-Instruct")
    print(f"{result.trainable:,} trainable parameters ({result.trainable_percent:.2f}% of {result.total:,}); "
          f"loss {result.metrics[0]['loss']:.3f} -> {result.metrics[-1]['loss']:.4f}")

    after, after_pairs = exact_match(model, tok, held_out, max_new_tokens=12, batch_size=20)
    show_answers("After fine-tuning:", after_pairs, sentences)
    print(f"\nHeld-out exact match ({len(held_out)} examples): {100 * before:.0f}% before -> {100 * after:.0f}% after")
    print(f"Adapter: {result.saved}  (lmzoo generate \"...\" --adapter {result.saved})")
    if result.loss_png:
        print(f"Loss curve: {result.loss_png}")
    print(f"Total time: {time.perf_counter() - t0:.0f} s")
    return {"before": before, "after": after, "adapter": result.saved, "loss_png": result.loss_png}


def _records(path: str):
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
