"""Start-up, as a user waits for it: a fresh process from launch to its first generated token.

    python bench/startup.py [--runs 5] [--prompt "What is the capital of France?"]

Each engine runs as a fresh process (lmzoo: `lmzoo generate`, streamed, eager and with `--compile`;
llama.cpp through llama-cpp-python on the same GGUF, when installed), alternating, and the clock
stops at the first byte of the answer on its stdout. Peak RSS is the process's own (ru_maxrss of
the child). Prints medians (and min-max) over the runs.

`--compile` loads the decode step compiled ahead of time (lmzoo.infer.compiled) from
~/.cache/lmzoo/compiled; the warm-up run builds it when it is not there yet (about a minute),
so the timed runs measure what every run after the first one costs. The first token comes from
the prompt's pass, before the compiled step is loaded: the whole run shows that load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# The same chat prompt lmzoo's template renders for SmolLM2 (its default system turn included),
# then greedy steps written out as bench/llamacpp.py does: argmax of the last logits, eval it.
LLAMA_CPP = """
import sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads={threads}, n_threads_batch={threads}, verbose=False,
            logits_all=True)  # scores of the last position are read below; without it they stay zero here
text = ("<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n"
        "<|im_start|>user\\n" + sys.argv[2] + "<|im_end|>\\n<|im_start|>assistant\\n")
llm.eval(llm.tokenize(text.encode(), add_bos=False, special=True))
for _ in range(16):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    if token == llm.token_eos():
        break
    sys.stdout.write(llm.detokenize([token]).decode(errors="replace"))
    sys.stdout.flush()
    llm.eval([token])
"""


def first_token_seconds(command: list[str]) -> tuple[float, float, float]:
    """(seconds to the first byte of stdout, seconds to exit, peak RSS in MB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - start
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use
    total = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"the process failed (exit status {proc.returncode})")
    return ttft, total, usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                    help="an interpreter with llama-cpp-python (default: this one, when it has it)")
    args = ap.parse_args()

    import importlib.util

    import lmzoo

    gguf = lmzoo.default_model_path()
    lmzoo_generate = [sys.executable, "-m", "lmzoo", "generate", args.prompt, "--max-new-tokens", "16"]
    engines = {"lmzoo": lmzoo_generate, "lmzoo --compile": [*lmzoo_generate, "--compile"]}
    if args.llama_cpp or importlib.util.find_spec("llama_cpp") is not None:
        python = args.llama_cpp or sys.executable
        engines["llama.cpp"] = [python, "-c", LLAMA_CPP.format(threads=args.threads), gguf, args.prompt]
    else:
        print("llama-cpp-python is not installed: lmzoo alone (pip install -e .[bench])")
    for name, command in list(engines.items()):  # a warm-up each: the page cache holds the files afterwards
        try:
            first_token_seconds(command)
        except RuntimeError as e:
            print(f"{name}: left out: {e}")
            del engines[name]
    runs = {name: [] for name in engines}
    for i in range(args.runs):
        for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
            runs[name].append(first_token_seconds(engines[name]))
    print(f"{'engine':<16}{'first token s':>22}{'whole run s':>22}{'peak RSS MB':>14}   ({args.runs} fresh processes, "
          "median [min-max])")
    for name, rows in runs.items():
        cols = list(zip(*rows, strict=True))
        cells = [f"{statistics.median(c):.2f} [{min(c):.2f}-{max(c):.2f}]" for c in cols[:2]]
        print(f"{name:<16}{cells[0]:>22}{cells[1]:>22}{statistics.median(cols[2]):>14.0f}")


if __name__ == "__main__":
    main()
