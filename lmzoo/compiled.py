"""A compiled decode step: one token through the whole decoder as one torch.compile graph.

    model.decode_step = CompiledDecodeStep(model)   # what prepare_for_inference(..., compile=True) does
    logits = model.decode_step(token_ids, cache)     # [B, 1] -> [B, 1, vocab]; lmzoo.generate uses it

Decoding one token on a CPU runs about 45 small ops per block, each costing a few microseconds
of Python and dispatch on top of its work. For a small model those costs are as large as the
matrix products themselves (int4: ~8 of ~13 ms per token). Compiled, the norms, rotary,
residuals and cache writes of a step become a few fused C++ loops, and the Python is gone.

The step is compiled with dynamic shapes, so a growing cache, another batch size or another
prompt length reuse one graph instead of compiling again. Compiling takes ~30-40 s on a small
CPU (the first call), so it is opt-in: `lmzoo generate --compile`. The prompt itself is run
eagerly (one call; its shapes vary from prompt to prompt).

It computes what the eager step computes: the tests check equal greedy tokens, and logits
within fp32 rounding (to two bf16 steps for the bf16 kernels of int4/int8), in
tests/test_fast_paths.py.
"""

from __future__ import annotations

import itertools
import types

import torch

from .errors import LmzooError


def _decode_step(model, input_ids, cache):
    return model(input_ids, cache=cache)


_COPIES = itertools.count()


class CompiledDecodeStep:
    def __init__(self, model):
        self.model = model
        # Before each call torch.compile checks that its graph still applies ("guards"). Checking
        # every module and weight of the model costs ~1 ms a token, as much as 4 of the 30 blocks,
        # so the step first tries to skip those checks and guard only its inputs (token ids, cache).
        # That is safe only when the whole step is ONE graph whose code belongs to this model alone:
        # - fullgraph=True: any graph break (MoE's data-dependent routing, say) would compile the
        #   module's own method as a separate frame, whose graph the same module type in another
        #   layer or another model would then reuse unchecked. Such models fall back to a
        #   compile with every guard (below).
        # - compiled graphs are kept per code object, so each model gets its own copy of the
        #   step's code: two models in one process never share a graph.
        # The model must not be changed after it is prepared (prepare a fresh one instead).
        code = _decode_step.__code__
        name = f"decode_step_{next(_COPIES)}"
        self.step = types.FunctionType(code.replace(co_name=name), _decode_step.__globals__)
        self.compiled = torch.compile(self.step, dynamic=True, fullgraph=True,
                                      options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.one_graph = True

    def __call__(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        try:
            return self.compiled(self.model, input_ids, cache)
        except LmzooError:
            raise
        except Exception as e:
            if self.one_graph:  # not one graph (a graph break): nothing has run yet; compile with every guard
                self.one_graph = False
                self.compiled = torch.compile(self.step, dynamic=True)
                return self(input_ids, cache)
            # a missing C++ compiler, an unsupported op: say what to do instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LmzooError(f"torch.compile could not compile the decode step ({type(e).__name__}: {first[:200]}); "
                             "run without --compile (compile=False)") from e
