"""A 4-bit GGUF file kept 4-bit: peak memory and decode speed, against dequantizing it and llama.cpp.

    python bench/gguf_memory.py [--runs 3] [--tokens 64] [--llama-cpp PYTHON]

The model is a ~1.1B-parameter Llama (TinyLlama's shape with SmolLM2's 49k vocabulary) with
random weights, written once as Q4_0 by `lmzoo convert` (about 0.66 GB) into ~/.cache/lmzoo/bench.
Each engine runs as a fresh process, alternating, and loads the file, prefills a 32-token prompt
and decodes --tokens greedy tokens:
- lmzoo as `lmzoo generate` runs a GGUF file: Q4_0 blocks as int4 groups (lmzoo.infer.gguf_quant);
- lmzoo with --dtype float32: the file dequantized to fp32 (the training and parity path);
- llama.cpp through llama-cpp-python, when PYTHON (default: this one) can import it.
Decode speed is the decoded tokens over the time after the first; peak RSS is the child's own
high-water mark (VmHWM).
Prints medians (and min-max) and writes bench/gguf_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MODEL = os.path.expanduser("~/.cache/lmzoo/bench/llama-1.1b-random.Q4_0.gguf")
SHAPE = dict(n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5632, vocab_size=49152, max_seq_len=2048)

LMZOO = """
import sys, time, torch
import lmzoo
from lmzoo.infer.gguf_quant import load_gguf_quantized
from lmzoo.infer.prepare import prepare_for_inference
from lmzoo.nn.generate import stream
def peak():  # this process's own high-water RSS, MB (ru_maxrss would carry a forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
kept, n = sys.argv[1] == "kept", int(sys.argv[3])
model = load_gguf_quantized(sys.argv[2])[0] if kept else lmzoo.load(sys.argv[2], dtype="float32")[0]
prepare_for_inference(model)
stamps = []
with torch.no_grad():
    for _ in stream(model, torch.arange(1000, 1032)[None], n):
        stamps.append(time.perf_counter())
print((len(stamps) - 1) / (stamps[-1] - stamps[0]), peak())
"""

LLAMA_CPP = """
import sys, time
import numpy as np
from llama_cpp import Llama
def peak():  # this process's own high-water RSS, MB (ru_maxrss would carry a forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
llm = Llama(model_path=sys.argv[2], n_ctx=512, n_threads={threads}, n_threads_batch={threads}, verbose=False,
            logits_all=True)
n = int(sys.argv[3])
llm.eval(list(range(1000, 1032)))
stamps = []
for _ in range(n):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    stamps.append(time.perf_counter())
    llm.eval([token])
print((len(stamps) - 1) / (stamps[-1] - stamps[0]), peak())
"""


def make_model() -> None:
    if os.path.exists(MODEL):
        return
    import torch

    import lmzoo
    from lmzoo.formats.gguf_write import save_gguf

    print(f"writing {MODEL} once (random weights, Q4_0)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = lmzoo.from_config(lmzoo.preset("llama2-7b").replace(**SHAPE))
    tokenizer = lmzoo.load()[1]
    save_gguf(model, MODEL, tokenizer, type="q4_0")


def run(command: list[str]) -> tuple[float, float]:
    """(decode tokens/s, peak RSS in MB) of one fresh process."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        proc.returncode = proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{command[0]} failed: {err.read()[-2000:]}")
    speed, rss = out.strip().splitlines()[-1].split()
    return float(speed), float(rss)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--llama-cpp", default=sys.executable, help="a Python that imports llama_cpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    make_model()
    engines = {"lmzoo, kept Q4_0 (int4)": [sys.executable, "-c", LMZOO, "kept"],
               "lmzoo, --dtype float32": [sys.executable, "-c", LMZOO, "float"]}
    if subprocess.run([args.llama_cpp, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        engines["llama.cpp (llama-cpp-python)"] = [args.llama_cpp, "-c", LLAMA_CPP.format(threads=args.threads), "-"]
    else:
        print(f"note: {args.llama_cpp} cannot import llama_cpp; llama.cpp is left out", file=sys.stderr)
    results: dict[str, dict[str, list[float]]] = {name: {"tok_s": [], "rss_mb": []} for name in engines}
    for _ in range(args.runs):
        for name, command in engines.items():
            speed, rss = run([*command, MODEL, str(args.tokens)])
            results[name]["tok_s"].append(speed)
            results[name]["rss_mb"].append(rss)
    table = {name: {k: summary(v) for k, v in r.items()} for name, r in results.items()}
    print(f"{'engine':32s} {'decode tok/s':>22s} {'peak RSS MB':>22s}")
    for name, r in table.items():
        print(f"{name:32s} " + " ".join(f"{r[k]['median']:9.1f} ({r[k]['min']:.1f}-{r[k]['max']:.1f})" for k in r))
    file_mb = os.path.getsize(MODEL) / 2**20
    with open(os.path.join(os.path.dirname(__file__), "gguf_memory.json"), "w") as f:
        json.dump({"model": MODEL, "file_mb": file_mb, "shape": SHAPE, "tokens": args.tokens, "runs": args.runs,
                   "results": table}, f, indent=2)


if __name__ == "__main__":
    main()
