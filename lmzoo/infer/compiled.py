"""A compiled decode step: one token through the whole decoder as one torch.compile graph.

    model.decode_step = CompiledDecodeStep(model)   # what prepare_for_inference(..., compile=True) does
    logits = model.decode_step(token_ids, cache)     # [B, 1] -> [B, 1, vocab]; lmzoo.nn.generate uses it

Decoding one token on a CPU runs about 45 small ops per block, each costing a few microseconds
of Python and dispatch on top of its work. For a small model those costs are as large as the
matrix products themselves (int4: ~8 of ~13 ms per token). Compiled, the norms, rotary,
residuals and cache writes of a step become a few fused C++ loops, and the Python is gone.

The step is compiled with dynamic shapes, so a growing cache and another prompt length reuse
one graph instead of compiling again (one row and several rows are two graphs: torch
specializes sizes of 1). The prompt itself is run eagerly (one call; its shapes vary from
prompt to prompt).

On the CPU the step's matrix products are inductor's own kernels (`max_autotune_gemm`, backend
"CPP"): generated for each weight's shape at compile time and benchmarked there against ATen's,
the faster kept. For one row they read the weights at ~29 GB/s on this 2-core machine, where
ATen's int8 kernel reaches 12-13 GB/s at these small shapes (576 x 3072, say) and oneDNN's
packed fp32 kernel ~20 GB/s: the whole step got 1.4-2x faster in fp32, bf16 and int8. They need
the weights as constants of the graph ("freezing"), so the graph holds its own copy of them,
laid out for its kernels. That costs a second copy of the weights, and time: the first compile
benchmarks and builds those kernels (1-3 minutes on 2 cores), later processes find them in
torch's compile cache (13-90 s). So it is opt-in: `lmzoo generate --compile`.

Inside the compiled step attention for the one new query is a small product, a softmax and a
weighted sum that inductor fuses (lmzoo.nn.attention.one_query_attention): SDPA's CPU kernel spent
most of its time per call on set-up, ~62 us per layer in bf16.

It computes what the eager step computes: the tests check equal greedy tokens, and logits
within fp32 rounding (to two bf16 steps for bf16 weights and the bf16 kernels of int4/int8), in
tests/test_fast_paths.py.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings

import torch

from ..errors import LmzooError


def _decode_step(model, input_ids, cache, position_ids=None):
    return model(input_ids, cache=cache, position_ids=position_ids)


_COPIES = itertools.count()

# torch 2.13's kernel benchmark calls a deprecated storage API: not the user's concern.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", module="torch._inductor")

# inductor's settings while the step compiles on a CPU (see above); quiet: the benchmark of each
# shape's kernels would print a table per product.
_CPU_SETTINGS = dict(freezing=True, max_autotune_gemm=True, max_autotune_gemm_backends="CPP,ATEN",
                     autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)


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
        # torch.compile compiles inside a call (the first, or a new batch size's), so the settings
        # apply to every call. CUDA keeps inductor's defaults: these were measured on CPUs only.
        on_cpu = model.tok_emb.weight.device.type == "cpu"
        self.settings = torch._inductor.config.patch(**_CPU_SETTINGS) if on_cpu else contextlib.nullcontext()

    def __call__(self, input_ids: torch.Tensor, cache, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 1, vocab]; position_ids [B, 1] when rows are not where the cache says
        (lmzoo.serve's rows, aligned at their last slot)."""
        try:
            with self.settings:
                return self.compiled(self.model, input_ids, cache, position_ids)
        except LmzooError:
            raise
        except Exception as e:
            if self.one_graph:  # not one graph (a graph break): nothing has run yet; compile with every guard
                self.one_graph = False
                self.compiled = torch.compile(self.step, dynamic=True)
                return self(input_ids, cache, position_ids)
            # a missing C++ compiler, an unsupported op: say what to do instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LmzooError(f"torch.compile could not compile the decode step ({type(e).__name__}: {first[:200]}); "
                             "run without --compile (compile=False)") from e
