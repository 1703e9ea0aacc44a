"""lmzoo vs transformers (+peft) on a CUDA GPU: prefill, decode and a LoRA training step, bf16.

    bench/gpu.sh [--dtype bf16] [--repeats 5] [--model DIR|FILE.gguf] [--json bench/gpu_results.json]
    .venv/bin/python bench/gpu.py --device cpu --quick     # a smoke test of this script without a GPU

Both engines run the embedded default model on the same weights (as bench/bench.py: lmzoo loads
the GGUF, transformers loads the Hugging Face directory lmzoo writes from it), in `--dtype`, with
PyTorch's SDPA attention (flash attention on CUDA in bf16/fp16). Every timed call is bracketed by
torch.cuda.synchronize(), so the figures are the GPU's work, not its launch queue.

Rows (tokens / s, medians of --repeats alternating runs):
    prefill     one forward over 2048 tokens (256 with --quick), the last position's logits
    decode      128 greedy new tokens (16 with --quick) after the 37-token decode prompt, batch 1
    decode_compiled   the same with lmzoo's compiled decode step (prepare_for_inference(compile=True)),
                against transformers' plain decode (its first call, the compile, is not timed)
    train_lora  one forward + backward of LoRA r=8 on every linear layer, 8 x 512 tokens
                (2 x 64 with --quick), the engines alternating; each one's peak of
                torch.cuda.max_memory_allocated beside it (see train_lora)
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
from training import build, step  # bench/training.py

import lmzoo
from bench import DECODE_PROMPT, HF, TEXT, Lmzoo, prompt_ids  # bench/bench.py
from lmzoo.infer.prepare import prepare_for_inference

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


def load(source, device, dtype):
    from transformers import AutoModelForCausalLM
    model, tok = lmzoo.load(source)
    hf_dir = lmzoo.save_hf_dir(model, os.path.join(tempfile.mkdtemp(prefix="lmzoo-gpu-"), "hf"), tok)
    ours = Lmzoo(model.to(device=device, dtype=dtype).eval())
    theirs = HF(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
                .to(device).eval())
    theirs.hf_dir = hf_dir
    return ours, theirs, tok


def training_model(engine, device, dtype):
    m = build(engine.name, "lora", engine.hf_dir)  # both engines load the same HF directory
    return m.to(device=device, dtype=dtype)


def train_lora(ours, theirs, device, dtype, ids, repeats):
    """Tokens/s of one LoRA step of each engine, alternating (a GPU step this small is bound by
    the host's Python and kernel launches, so the host's noise must hit both alike), and each
    engine's peak memory: the peak during its own step, less the other engine's resident model."""
    def allocated():
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    models, resident = {}, {}
    for e in (ours, theirs):
        before = allocated()
        models[e.name] = training_model(e, device, dtype)
        resident[e.name] = allocated() - before
        step(e.name, models[e.name], ids)  # warm-up
    rates = {name: [] for name in models}
    for r in range(repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            rates[name].append(ids.numel() / timed(lambda name=name: step(name, models[name], ids), device))
    fig = {name: statistics.median(v) for name, v in rates.items()}
    fig["ratio"] = fig["lmzoo"] / fig["transformers"]
    if device.type == "cuda":
        for name, other in (("lmzoo", "transformers"), ("transformers", "lmzoo")):
            torch.cuda.reset_peak_memory_stats(device)
            step(name, models[name], ids)
            fig[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(device) - resident[other]
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_results.json"))
    args, _ = p.parse_known_args(argv)  # bench/gpu.sh hands both scripts its options: the rest are gpu_check.py's
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures a GPU (try --device cpu --quick for a smoke test)")
        return 1
    prefill_len, new_tokens, batch = (256, 16, (2, 64)) if args.quick else (2048, 128, (8, 512))
    ours, theirs, tok = load(args.model, device, dtype)
    ours.hf_dir = theirs.hf_dir
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
                    runs[e.name].append(tokens / timed(lambda call=call, e=e: call(e), device))
            results[name] = fig = {k: statistics.median(v) for k, v in runs.items()}
            fig["ratio"] = fig["lmzoo"] / fig["transformers"]
            print(f"{name:<12}{fig['lmzoo']:>14.1f}{fig['transformers']:>20.1f}{fig['ratio']:>8.2f}", flush=True)

    theirs.model = ours.model = None  # ours.plain stays for the compiled decode step below
    results["train_lora"] = fig = train_lora(ours, theirs, device, dtype, train, args.repeats)
    print(f"{'train_lora':<12}{fig['lmzoo']:>14.1f}{fig['transformers']:>20.1f}{fig['ratio']:>8.2f}")
    if device.type == "cuda":
        ratio = fig["lmzoo_peak_bytes"] / fig["transformers_peak_bytes"]
        print(f"train_lora peak memory: {fig['lmzoo_peak_bytes'] / 2**20:.0f} vs "
              f"{fig['transformers_peak_bytes'] / 2**20:.0f} MiB ({ratio:.2f}x)", flush=True)

    # Last: torch.compile leaves worker processes and caches behind, which must not touch the other rows.
    with torch.inference_mode():
        compiled = prepare_for_inference(copy.deepcopy(ours.plain), compile=True)
        t = time.perf_counter()
        compiled.generate(decode, new_tokens)  # the compile
        first = time.perf_counter() - t
        rate = statistics.median(new_tokens / timed(lambda: compiled.generate(decode, new_tokens), device)
                                 for _ in range(args.repeats))
        theirs_rate = results["decode"]["transformers"]
        results["decode_compiled"] = {"lmzoo": rate, "transformers": theirs_rate, "ratio": rate / theirs_rate,
                                      "compile_s": first}
        print(f"{'decode_compiled':<12}{rate:>14.1f}{theirs_rate:>20.1f}{rate / theirs_rate:>8.2f}"
              f"   (lmzoo compiled; first call {first:.0f} s)", flush=True)

    with open(args.json, "w") as f:
        json.dump({"device": str(device), "dtype": args.dtype, "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
