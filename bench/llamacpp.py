"""llama.cpp as a third engine of bench/bench.py, through llama-cpp-python (the optional `bench`
extra: `pip install -e .[bench]`, a source build of about 8 minutes; never needed by the tests).

It runs the embedded GGUF file itself, in its own formats (the blocks in 4-bit Q4_1, the token
embedding / head in 8-bit Q8_0), with as many threads as the other engines. Its rows:

    last_logits(ids)   prefill of the prompt, logits of the last position only (logits_all=False)
    generate(ids, n)   the same prefill, then n greedy steps: argmax of the last logits, eval that token

Greedy decoding is written out (argmax, then eval) rather than going through llama-cpp-python's
sampler chain, so the loop is the same as lmzoo's: the timed work is llama.cpp's forward passes.
"""
from __future__ import annotations

import numpy as np
import torch


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf_path: str, threads: int, n_ctx: int = 1024):
        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)

    def _prefill(self, ids: torch.Tensor) -> np.ndarray:
        self.llm.reset()  # forget the previous run's cache
        self.llm.eval(ids[0].tolist())
        return self.llm.scores[self.llm.n_tokens - 1]

    def last_logits(self, ids):
        return torch.from_numpy(np.array(self._prefill(ids)))[None, None]

    def generate(self, ids, n):
        logits = self._prefill(ids)
        new = []
        for _ in range(n):
            token = int(np.argmax(logits))
            new.append(token)
            self.llm.eval([token])
            logits = self.llm.scores[self.llm.n_tokens - 1]
        return torch.tensor([new])
