"""`finetune`: data file in, trained adapter (or model) out, with metrics and a loss curve."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import LmzooError
from .data import DataReport, Example, load_examples, pack, split
from .loop import TrainConfig, Trainer

METHODS = ("full", "lora", "ptuning-v2", "prompt-tuning")


@dataclass
class FinetuneResult:
    out_dir: str
    saved: str  # the adapter or model directory
    metrics: list[dict]
    data: DataReport
    trainable: int
    total: int
    val: list[Example] = field(default_factory=list)
    loss_png: str | None = None
    val_loss: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(m["tokens"] for m in self.metrics) / max(1e-9, sum(m["seconds"] for m in self.metrics))

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total


def prepare(model, method: str, *, lora=None, prefix=None, prompt=None) -> None:
    """Freeze the backbone and attach what `method` trains."""
    from ..peft import LoraConfig, PrefixConfig, PromptConfig, add_lora, add_virtual

    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
    elif method == "lora":
        add_lora(model, lora or LoraConfig())
    elif method == "ptuning-v2":
        add_virtual(model, prefix or PrefixConfig())
    elif method == "prompt-tuning":
        add_virtual(model, prompt or PromptConfig())
    else:
        raise LmzooError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def finetune(model, tokenizer, data: str, out_dir: str, *, method: str = "lora", lora=None, prefix=None, prompt=None,
             train: TrainConfig | None = None, val_fraction: float = 0.0, skip_bad_lines: bool = False,
             too_long: str = "truncate", packing: bool = False, resume: bool = False, max_len: int | None = None,
             world=None, base_name: str | None = None, stop_after: int | None = None,
             val_data: str | None = None) -> FinetuneResult:
    train = train or TrainConfig()
    report = DataReport()
    max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    examples = load_examples(data, tokenizer, max_len, skip_bad_lines=skip_bad_lines, too_long=too_long,
                             report=report)
    train_set, val_set = split(examples, val_fraction, train.seed) if val_fraction else (examples, [])
    if val_data:  # a held-out file instead of a split
        val_set = load_examples(val_data, tokenizer, max_len, skip_bad_lines=skip_bad_lines, too_long=too_long)
    if not train_set:
        raise LmzooError(f"{data}: no training examples are left after the validation split")
    if packing:
        train_set = pack(train_set, max_len)
    prepare(model, method, lora=lora, prefix=prefix, prompt=prompt)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    trainer = Trainer(model, train_set, train, pad_id=pad_id, out_dir=out_dir, val=val_set, world=world)
    metrics = trainer.run(resume=resume, stop_after=stop_after)
    val_loss = trainer.evaluate()["val_loss"] if val_set else None
    if world is not None:  # every process helps gather the weights; the first one writes them
        full = world.full_model_state(model)
        if world.rank == 0:
            model = rebuild(model.config, full, method, lora=lora, prefix=prefix, prompt=prompt)
    saved = save_result(model, tokenizer, method, out_dir, base_name, world)
    png = None
    if world is None or world.rank == 0:
        from .plots import plot_loss

        png = plot_loss(metrics, os.path.join(out_dir, "loss.png"), title=f"{method} fine-tuning")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FinetuneResult(out_dir, saved, metrics, report, trainable, total, val_set, png, val_loss)


def rebuild(config, state, method, **adapters):
    """A plain (unsharded) model holding `state`, with the same adapter attached."""
    from ..formats.checkpoint import from_config

    model = from_config(config)
    prepare(model, method, **adapters)
    model.load_state_dict(state)
    return model


def save_result(model, tokenizer, method: str, out_dir: str, base_name, world=None) -> str:
    if world is not None and world.rank != 0:
        return ""
    if method == "full":
        from ..formats.checkpoint import save_hf_dir

        return save_hf_dir(model, os.path.join(out_dir, "model"), tokenizer)
    from ..formats.peft import save_adapter

    return save_adapter(model, os.path.join(out_dir, "adapter"), base_name=base_name)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 48,
                batch_size: int = 8) -> tuple[float, list[tuple[str, str]]]:
    """Share of examples whose generated answer equals the reference (whitespace-trimmed)."""
    model.eval()
    scored = [ex for ex in examples if ex.prompt is not None and ex.answer is not None]
    if not scored:
        raise LmzooError("exact match needs chat or prompt/response examples")
    pairs = []
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        # eagerly: a compiled step built in the background would compete with this short evaluation
        outs = model.generate([ex.prompt for ex in chunk], max_new_tokens=max_new_tokens,
                              stop_tokens=tokenizer.stop_ids, compile=False)
        for ex, out in zip(chunk, outs, strict=True):
            new = [t for t in out[len(ex.prompt):] if t not in tokenizer.stop_ids]
            pairs.append((ex.answer, tokenizer.decode(new, skip_special_tokens=True)))
    correct = sum(a.strip() == g.strip() for a, g in pairs)
    return correct / len(pairs), pairs
