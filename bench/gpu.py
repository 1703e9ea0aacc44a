"""lmzoo vs transformers (+peft) on a CUDA GPU: prefill, decode and a LoRA training step, bf16.

    bench/gpu.sh [--dtype bf16] [--repeats 5] [--json bench/gpu_results.json]
    .venv/bin/python bench/gpu.py --device cpu --quick     # a smoke test of this script without a GPU

Both engines run the embedded default model on the same weights (as bench/bench.py: lmzoo loads
the GGUF, transformers loads the Hugging Face directory lmzoo writes from it), in `--dtype`, with
PyTorch's SDPA attention (flash attention on CUDA in bf16/fp16). Every timed call is bracketed by
torch.cuda.synchronize(), so the figures are the GPU's work, not its launch queue.

Rows (tokens / s, medians of --repeats alternating runs):
    prefill     one forward over 2048 tokens (256 with --quick), the last position's logits
    decode      128 greedy new tokens (16 with --quick) after the 37-token decode prompt, batch 1
    train_lora  one forward + backward of LoRA r=8 on every linear layer, 8 x 512 tokens
                (2 x 64 with --quick); the peak of torch.cuda.max_memory_allocated beside it
Not in CI: it needs a GPU (`bench/gpu.sh` checks for one).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import lmzoo
from bench import DECODE_PROMPT, HF, TEXT, Lmzoo, prompt_ids  # bench/bench.py
from training import build, step  # bench/training.py

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def load(device, dtype):
    from transformers import AutoModelForCausalLM
    model, tok = lmzoo.load()
    hf_dir = lmzoo.save_hf_dir(model, os.path.join(tempfile.mkdtemp(prefix="lmzoo-gpu-"), "hf"), tok)
    ours = Lmzoo(model.to(device=device, dtype=dtype).eval())
    theirs = HF(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
                .to(device).eval())
    theirs.hf_dir = hf_dir
    return ours, theirs, tok


def training_model(engine, device, dtype):
    m = build(engine.name, "lora", getattr(engine, "hf_dir", None))
    return m.to(device=device, dtype=dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_results.json"))
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures a GPU (try --device cpu --quick for a smoke test)")
        return 1
    prefill_len, new_tokens, batch = (256, 16, (2, 64)) if args.quick else (2048, 128, (8, 512))
    ours, theirs, tok = load(device, dtype)
    prefill = prompt_ids(tok, TEXT, prefill_len).to(device)
    decode = torch.tensor([tok.encode(DECODE_PROMPT)], device=device)
    train = prompt_ids(tok, TEXT, batch[0] * batch[1]).reshape(*batch).to(device)

    rows = {
        "prefill": (lambda e: e.last_logits(prefill), prefill.shape[1]),
        "decode": (lambda e: e.generate(decode, new_tokens), new_tokens),
    }
    results = {}
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, {args.dtype}")
    print(f"{'row':<12}{'lmzoo tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    with torch.inference_mode():
        for name, (call, tokens) in rows.items():
            runs = {e.name: [] for e in (ours, theirs)}
            for e in (ours, theirs):
                call(e)  # warm-up
            for r in range(args.repeats):
                for e in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
                    runs[e.name].append(tokens / timed(lambda: call(e), device))
            results[name] = fig = {k: statistics.median(v) for k, v in runs.items()}
            fig["ratio"] = fig["lmzoo"] / fig["transformers"]
            print(f"{name:<12}{fig['lmzoo']:>14.1f}{fig['transformers']:>20.1f}{fig['ratio']:>8.2f}", flush=True)

    ours.model = ours.plain = theirs.model = None  # free the inference copies before training
    fig = {}
    for e in (ours, theirs):
        model = training_model(e, device, dtype)
        step(e.name, model, train)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates = [train.numel() / timed(lambda: step(e.name, model, train), device) for _ in range(args.repeats)]
        fig[e.name] = statistics.median(rates)
        if device.type == "cuda":
            fig[f"{e.name}_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        del model
    fig["ratio"] = fig["lmzoo"] / fig["transformers"]
    results["train_lora"] = fig
    print(f"{'train_lora':<12}{fig['lmzoo']:>14.1f}{fig['transformers']:>20.1f}{fig['ratio']:>8.2f}")
    if device.type == "cuda":
        ratio = fig["lmzoo_peak_bytes"] / fig["transformers_peak_bytes"]
        print(f"train_lora peak memory: {fig['lmzoo_peak_bytes'] / 2**20:.0f} vs "
              f"{fig['transformers_peak_bytes'] / 2**20:.0f} MiB ({ratio:.2f}x)")
    with open(args.json, "w") as f:
        json.dump({"device": str(device), "dtype": args.dtype, "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
