"""`lmzoo compare-peft`: the source document's LoRA vs P-tuning v2 comparison, measured.

Every method trains on the same data for the same number of steps of the same batch size,
each in a fresh process so that its peak memory is its own. The table reports what each
method trains, what it saves, how fast it trains, how much memory it needs, and how well the
result does on held-out data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..errors import LmzooError

METHODS = ("lora", "ptuning-v2", "prompt-tuning")
# Each method at a learning rate that suits it (prefixes and prompts want larger steps).
LEARNING_RATES = {"lora": 3e-3, "ptuning-v2": 1e-2, "prompt-tuning": 3e-2, "full": 5e-5}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), the figure `time -v` calls max RSS."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def worker(method: str, data: str, test: str, out: str, steps: int, batch_size: int, seed: int,
           model_source: str | None = None) -> dict:
    """Train one method and measure it (runs in its own process)."""
    import torch

    from ..formats.checkpoint import load
    from ..peft import LoraConfig, PrefixConfig, PromptConfig
    from . import TrainConfig, exact_match, finetune
    from .data import load_examples

    torch.manual_seed(seed)
    model, tok = load(model_source)
    result = finetune(model, tok, data, out, method=method, val_data=test,
                      lora=LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")),
                      prefix=PrefixConfig(n_virtual=32), prompt=PromptConfig(n_virtual=20),
                      train=TrainConfig(steps=steps, lr=LEARNING_RATES[method], batch_size=batch_size,
                                        warmup_steps=max(1, steps // 10), seed=seed, progress=False))
    held_out = load_examples(test, tok, model.config.max_seq_len)
    accuracy, _ = exact_match(model, tok, held_out, max_new_tokens=16, batch_size=20)
    return {"method": method, "trainable": result.trainable, "total": result.total,
            "trainable_percent": result.trainable_percent, "saved_bytes": dir_bytes(result.saved),
            "tokens_per_s": result.tokens_per_s, "peak_rss_bytes": peak_rss_bytes(),
            "val_loss": result.val_loss, "exact_match": accuracy, "final_train_loss": result.metrics[-1]["loss"]}


def run(out_dir: str, *, data: str | None = None, steps: int = 40, batch_size: int = 8, with_full: bool = False,
        seed: int = 0, model: str | None = None) -> list[dict]:
    from tqdm import tqdm

    from .tasks import dates

    if data is None:
        data, test = dates.write(os.path.join(out_dir, "data"), n_train=2000, n_test=60, seed=seed)
    else:
        data, test = _held_out_split(data, out_dir, seed)
    methods = METHODS + (("full",) if with_full else ())
    rows = []
    for method in tqdm(methods, desc="methods", unit="method"):
        args = [sys.executable, "-m", "lmzoo.train.compare_peft", method, data, test, os.path.join(out_dir, method),
                str(steps), str(batch_size), str(seed), model or ""]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LmzooError(f"compare-peft: the {method} run failed: {last}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "batch_size": batch_size, "data": data, "held_out": test, "rows": rows}, f,
                  indent=2)
    print(table(rows, steps, batch_size))
    print(f"\nchart: {chart(rows, os.path.join(out_dir, 'compare.png'))}")
    return rows


def _held_out_split(data: str, out_dir: str, seed: int) -> tuple[str, str]:
    """Keep a tenth of a user's file for evaluation; train on the rest."""
    import random

    from .data import read_jsonl

    records = read_jsonl(data)
    random.Random(seed).shuffle(records)
    n = max(1, len(records) // 10)
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    paths = {}
    for name, part in (("train", records[n:]), ("test", records[:n])):
        paths[name] = os.path.join(out_dir, "data", f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths["train"], paths["test"]


def table(rows: list[dict], steps: int, batch_size: int) -> str:
    head = ["method", "trainable", "%", "saved", "train tok/s", "peak RSS", "val loss", "exact match"]
    lines = [f"{steps} steps x {batch_size} examples, same data, fp32, CPU",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f"{r['trainable']:,}", f"{r['trainable_percent']:.3f}%", _size(r["saved_bytes"]),
            f"{r['tokens_per_s']:.0f}", _size(r["peak_rss_bytes"]), f"{r['val_loss']:.3f}",
            f"{100 * r['exact_match']:.0f}%"]) + " |")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def chart(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("held-out exact match (%)", [100 * r["exact_match"] for r in rows]),
              ("validation loss", [r["val_loss"] for r in rows]),
              ("trainable parameters (%)", [r["trainable_percent"] for r in rows]),
              ("train tokens/s", [r["tokens_per_s"] for r in rows]),
              ("peak RSS (GB)", [r["peak_rss_bytes"] / 2**30 for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"][:len(rows)]
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("LoRA vs P-tuning v2 vs prompt tuning, same data and budget", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":  # the worker: python -m lmzoo.train.compare_peft METHOD DATA TEST OUT STEPS BATCH SEED MODEL
    m, d, t, o, s, b, seed, source = sys.argv[1:9]
    print(json.dumps(worker(m, d, t, o, int(s), int(b), int(seed), source or None)))
