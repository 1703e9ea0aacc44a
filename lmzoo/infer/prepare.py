"""Make a loaded model fast for inference, without changing what it computes.

    prepare_for_inference(model)            # fuse, then pack the weights for the CPU's matmul library
    prepare_for_inference(model, "int8")    # fuse, then quantize (lmzoo.infer.quant) instead of packing
    prepare_for_inference(model, compile=True)  # ... and compile the decode step (lmzoo.infer.compiled)
    prepare_for_inference(model, compile="background")  # ... decoding eagerly until it is compiled

Decoding one token reads every weight once, so it is bound by memory bandwidth and by the
overhead of each call. Four things help, in this order:

1. fuse_projections (lmzoo.infer.fuse): q|k|v and gate|up become one matrix each (the layout Qwen1 and ChatGLM
   already use): 4 matrix products per block instead of 7.
2. PackedLinear: the weight is rearranged once into the blocked layout oneDNN reads fastest.
   A matrix-vector product then streams memory at ~26 GB/s here instead of the ~11 GB/s of the
   default (MKL) path, and large products (prefill) gain 10-25% too.
3. quantization (lmzoo.infer.quant) moves fewer bytes per weight.
4. a compiled decode step (lmzoo.infer.compiled) removes the per-op overhead between the products.

The result is for inference only: the parameter names change, packed weights cannot be saved
or trained, and an attached LoRA adapter is merged into the weights first.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from ..errors import LmzooError
from ..nn.linear import ONEDNN, is_plain_linear, onednn_linear
from .fuse import fuse_projections

# Packed weights by handle, for a graph that torch.compile traces: it cannot trace an opaque oneDNN
# tensor, so the graph calls `lmzoo::packed_linear` with the weight's handle instead, and the op runs
# outside the graph. Weak: a freed module frees its weight.
_PACKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("lmzoo::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return onednn_linear(x, _PACKED[handle], bias)


@_packed_linear.register_fake
def _(x, handle, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y = x W^T + b, with W stored in oneDNN's blocked layout (an opaque `torch._mkldnn` tensor).

    The same sums as nn.Linear in another order: outputs differ from F.linear by fp32 rounding
    (~1e-6 relative). bf16 weights take bf16 inputs, as nn.Linear would."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.dtype = w.dtype
        # The packed tensor is opaque (no strides, no storage to save): a plain attribute, not a buffer.
        # No batch-size hint: the default layout is as fast as a batch-1 one for decoding, and much
        # faster for batched decoding and prefill (measured: 40 vs 64 ms per 8-row step).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
        self.handle = next(_HANDLES)
        _PACKED[self.handle] = self.packed
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def supports(linear: nn.Module) -> bool:
        """A plain CPU nn.Linear in fp32 (or bf16 where the CPU computes bf16 natively)."""
        if not is_plain_linear(linear) or linear.weight.device.type != "cpu":
            return False
        if not ONEDNN:
            return False
        dtype = linear.weight.dtype
        return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _packed_linear(x.to(self.dtype), self.handle, self.out_features, self.bias).to(x.dtype)
        if x.dtype == self.dtype:  # the usual case: one op, any number of leading dims
            return onednn_linear(x, self.packed, self.bias)
        y = onednn_linear(x.to(self.dtype), self.packed, self.bias)
        return y.to(x.dtype)

    def unpacked(self) -> torch.Tensor:
        """The weight as a plain [out, in] tensor (for tests and inspection)."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return onednn_linear(eye, self.packed).t().contiguous()


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every packable nn.Linear (see PackedLinear.supports) by a PackedLinear, in place.
    MoE routers stay exact nn.Linear: their scores pick experts."""
    for name, m in list(model.named_modules()):
        if name.endswith("router") or not PackedLinear.supports(m):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(m))
    return model


@torch.no_grad()
def prepare_for_inference(model: nn.Module, quantize: str | None = None, compile: bool | str = False) -> nn.Module:
    """Fuse projections, then quantize (`quantize` = "int8" or "int4") or pack the weights.
    In place; returns the model in eval mode. A LoRA adapter is merged into the weights first.
    compile=True also gives the model a compiled decode step (lmzoo.infer.compiled), which
    lmzoo.nn.generate then uses for every token after the prompt: built at the first token the
    first time (about a minute), loaded from disk later. compile="background" decodes eagerly
    while it is built."""
    if compile not in (False, True, "background"):
        raise LmzooError(f"compile={compile!r}: expected False, True or 'background'")
    from ..peft import strip_lora

    strip_lora(model)
    model.eval()
    fuse_projections(model)
    if quantize:
        from .quant import quantize as quantize_weights

        quantize_weights(model, quantize)
    elif not compile:
        # A compiled step's graph takes the plain weights as its inputs (lmzoo.infer.compiled); oneDNN's
        # packed tensors are opaque to it, and a packed copy besides would be a second.
        pack_linears(model)
    if compile:
        from .compiled import CompiledDecodeStep

        model.decode_step = CompiledDecodeStep(model, background=compile == "background")
    else:  # asked not to compile: not the default step of plain models either (lmzoo.infer.compiled)
        model.decode_step = False
    return model
