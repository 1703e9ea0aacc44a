"""The training loop shared by every method (full, LoRA, P-tuning v2, prompt tuning).

AdamW with warmup and cosine decay, gradient accumulation and clipping, optional bf16
autocast and gradient checkpointing, a progress bar, metrics.jsonl, and atomic checkpoints
that resume exactly: the data order, the optimizer and scheduler state, and the random state
all come back, so a resumed run's loss curve is the uninterrupted run's.

bf16, two ways:
- a bf16 model (`lmzoo finetune --dtype bfloat16`): for LoRA and virtual tokens, the frozen
  base is stored and computed in bf16 while the adapters, their gradients and AdamW's state
  are fp32 (lmzoo.peft creates them so) and the loss is fp32: the fastest mixed precision
  (bf16 matmuls, no casts of the base per step). Full fine-tuning of a bf16 model trains
  bf16 weights.
- `TrainConfig.bf16` (`--bf16`): fp32 weights under autocast; every matmul runs in bf16 on
  casts made each step. Right for full fine-tuning, which keeps fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import LmzooError
from ..formats.atomic import atomic_dir, restore_interrupted
from ..formats.manifest import verify_manifest, write_manifest
from ..formats.state import read_state, write_state
from .data import IGNORE, Example, collate

CHECKPOINT = "checkpoint"
PREVIOUS = ".previous"  # checkpoint.previous: the generation before, for when the latest is damaged
TRAINER_STATE = "trainer"  # trainer.json + trainer.safetensors: optimizer, scheduler, random generators


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8  # examples per optimizer step, across accumulation and processes
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False  # autocast to bf16 (see the top)
    grad_checkpointing: bool = False
    save_every: int = 0  # steps between checkpoints (0: at the end only)
    eval_every: int = 0
    progress: bool = True


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Trainer:
    def __init__(self, model, train: list[Example], cfg: TrainConfig, *, pad_id: int, out_dir: str | None = None,
                 val: list[Example] | None = None, world=None):
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise LmzooError("batch size and gradient accumulation must be >= 1")
        self.model, self.train_set, self.val_set, self.cfg = model, train, val or [], cfg
        self.pad_id, self.out_dir = pad_id, out_dir
        self.world = world  # lmzoo.train.distributed.World, or None for one process
        self.micro_size = cfg.batch_size // cfg.grad_accum // (world.size if world else 1)
        if self.micro_size < 1:
            raise LmzooError(f"--batch-size {cfg.batch_size} is smaller than grad_accum x processes")
        per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total_steps = cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs))
        # Under torchrun the model is replicated (DDP) or sharded (FSDP) before the optimizer sees it.
        self.loss_module = world.wrap(model) if world else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise LmzooError("nothing to train: every parameter is frozen")
        # fused: one pass per parameter and no temporaries. The default (foreach) AdamW makes
        # a parameter-sized temporary of every parameter (+513 MB when all of a 135M model
        # trains) and is 7x slower on CPU.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps))
        self.step = 0
        self.metrics: list[dict] = []
        self._orders: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ data order
    def _order(self, epoch: int) -> list[int]:
        """The examples of an epoch, shuffled by (seed, epoch) alone: resumable by construction."""
        if epoch not in self._orders:
            order = list(range(len(self.train_set)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def global_batch(self, step: int) -> list[Example]:
        """The batch_size examples of optimizer step `step`, wrapping into later epochs."""
        bs, n = self.cfg.batch_size, len(self.train_set)
        out = []
        for k in range(step * bs, (step + 1) * bs):
            epoch, idx = divmod(k, n)
            out.append(self.train_set[self._order(epoch)[idx]])
        return out

    def micro_batches(self, step: int):
        batch = self.global_batch(step)
        if self.world:
            batch = batch[self.world.rank::self.world.size]
        for a in range(self.cfg.grad_accum):
            part = batch[a * self.micro_size:(a + 1) * self.micro_size]
            if part:
                yield collate(part, self.pad_id)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.cfg.bf16:
            device = self.params[0].device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over labelled tokens, tokens processed)."""
        self.model.train()
        micro = list(self.micro_batches(step))
        labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        stats = torch.tensor([float(labelled), float(tokens)])
        if self.world:
            stats = self.world.all_reduce_sum(stats)
        labelled_all = max(1.0, float(stats[0]))
        total = torch.zeros(())
        device = self.params[0].device
        # Data-parallel wrappers average gradients over processes; the loss is already normalised
        # by the whole global batch, so scale it back up by the number of processes. The loss
        # takes that scale itself (Decoder.loss's `scale`), so backward copies nothing to apply it.
        processes = self.world.size if self.world else 1
        scale = processes / labelled_all
        for b in micro:
            ids, labels, mask = b["input_ids"].to(device), b["labels"].to(device), b["attention_mask"].to(device)
            with self._autocast():
                if self.loss_module is not None:
                    scaled = self.loss_module(ids, labels, mask, scale)
                else:
                    scaled = self.model.loss(ids, labels, attention_mask=mask, reduction="sum", scale=scale)
                aux = self.model.moe_aux_loss()
            total += scaled.detach().float().cpu()
            if aux is not None:
                scaled = scaled + 0.01 * aux / len(micro)
            scaled.backward()
        if self.world:
            total = self.world.all_reduce_sum(total)
        mean = float(total) / processes  # the summed losses over labelled_all, with `scale` undone
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {os.path.join(self.out_dir, CHECKPOINT)}" if self.out_dir else ""
            raise LmzooError(f"the loss became {mean} at step {step + 1}; training stopped{where}")
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean, int(stats[1])

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and perplexity over the held-out examples."""
        self.model.eval()
        loss_sum, count = 0.0, 0
        device = self.params[0].device
        for start in range(0, len(self.val_set), self.micro_size):
            b = collate(self.val_set[start:start + self.micro_size], self.pad_id)
            with self._autocast():
                loss_sum += float(self.model.loss(b["input_ids"].to(device), b["labels"].to(device),
                                                  attention_mask=b["attention_mask"].to(device), reduction="sum"))
            count += int((b["labels"][:, 1:] != IGNORE).sum())
        val_loss = loss_sum / max(1, count)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    # ------------------------------------------------------------------ the run
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Train to the end, or stop after `stop_after` more steps with a checkpoint; returns the metrics."""
        if resume:
            self.load_checkpoint()
        elif self._is_writer() and os.path.exists(os.path.join(self.out_dir, "metrics.jsonl")):
            os.remove(os.path.join(self.out_dir, "metrics.jsonl"))  # a fresh run starts a fresh record
        self.model.gradient_checkpointing = self.cfg.grad_checkpointing
        bar = self._progress_bar()
        started, tokens_seen = time.perf_counter(), 0
        last = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        while self.step < last:
            t0 = time.perf_counter()
            loss, tokens = self.train_step(self.step)
            self.step += 1
            tokens_seen += tokens
            elapsed = time.perf_counter() - started
            seconds = time.perf_counter() - t0
            row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": tokens,
                   "seconds": seconds, "tokens_per_s": tokens / max(1e-9, seconds)}
            if self.cfg.eval_every and self.val_set and (self.step % self.cfg.eval_every == 0 or self.step == last):
                row.update(self.evaluate())
            self.metrics.append(row)
            self._append_metrics(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(1e-9, elapsed):.0f}")
            if self.out_dir and ((self.cfg.save_every and self.step % self.cfg.save_every == 0)
                                 or self.step == last):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.metrics

    def _progress_bar(self):
        if not self.cfg.progress or (self.world and self.world.rank != 0):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ files
    def _is_writer(self) -> bool:
        return self.out_dir is not None and (self.world is None or self.world.rank == 0)

    def _append_metrics(self, row: dict) -> None:
        if self._is_writer():
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.world:
            return self.world.full_state(self.model)
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly, written atomically."""
        from safetensors.torch import save_file

        state = self.trainable_state()
        optimizer = (self.world.optimizer_state(self.model, self.optimizer) if self.world
                     else self.optimizer.state_dict())
        if not self._is_writer():
            if self.world:
                self.world.barrier()
            return
        path = os.path.join(self.out_dir, CHECKPOINT)
        with atomic_dir(path, keep_previous=path + PREVIOUS) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "trainable.safetensors"))
            # JSON + safetensors, never a pickle: --resume must not run code from a file (formats.state)
            write_state({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "step": self.step,
                         "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                        os.path.join(tmp, TRAINER_STATE))
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "total_steps": self.total_steps, "config": asdict(self.cfg),
                           "metrics": self.metrics}, f)
            write_manifest(tmp)  # last: sizes and SHA-256 of all of the above, checked by --resume
        if self.world:
            self.world.barrier()

    def _good_checkpoint(self) -> str:
        """The latest checkpoint whose files match their manifest; else the one before it, with a
        note saying why; else an error naming what is wrong with each."""
        latest = os.path.join(self.out_dir or "", CHECKPOINT)
        restore_interrupted(latest)
        problems = []
        for path in (latest, latest + PREVIOUS):
            if not os.path.isdir(path):
                continue
            try:
                verify_manifest(path)
            except LmzooError as e:
                problems.append(str(e))
                continue
            if problems:
                print(f"lmzoo: note: {problems[0]}; resuming from {path} instead", file=sys.stderr)
            return path
        if not problems:
            raise LmzooError(f"--resume: no checkpoint in {latest}")
        raise LmzooError(f"--resume: no intact checkpoint: {'; '.join(problems)}")

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        path = self._good_checkpoint()
        trainable = load_file(os.path.join(path, "trainable.safetensors"))
        if self.world:
            self.world.load_full_state(self.model, trainable)
        else:
            params = dict(self.model.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
            if missing:
                raise LmzooError(f"{path}: the checkpoint lacks {missing[:3]}: was it made with another method?")
            with torch.no_grad():
                for n, t in trainable.items():
                    params[n].copy_(t)
        if os.path.isfile(os.path.join(path, "trainer.pt")):
            raise LmzooError(f"{path}: this checkpoint keeps its trainer state in trainer.pt, a pickle (an older "
                             "lmzoo wrote it); lmzoo never unpickles, since a pickle can run code. "
                             "Start the run again without --resume")
        saved = read_state(os.path.join(path, TRAINER_STATE))
        if self.world:
            self.world.load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        self.step, self.metrics = saved["step"], state["metrics"]
        if self._is_writer():  # metrics.jsonl continues from the checkpoint, not from the crash
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.metrics)
