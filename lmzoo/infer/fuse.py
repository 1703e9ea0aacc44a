"""q|k|v and gate|up fused into one matrix each, as Qwen1 and ChatGLM already store them.

A block then makes 4 matrix products instead of 7: fewer calls, and each reads one larger
weight. prepare_for_inference does this first, then packs or quantizes the fused weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention import Attention
from ..nn.init import no_random_init
from ..nn.linear import Linear, is_plain_linear
from ..nn.mlp import MLP


def _fused(linears: list[nn.Linear]) -> Linear:
    """One Linear whose output rows are the given layers' outputs, one after the other."""
    first = linears[0]
    with no_random_init():  # the weights are the given layers', set below
        fused = Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                       device="meta", dtype=first.weight.dtype)
    if first.weight.is_meta:  # a loader fills it (lmzoo.infer.gguf_quant); torch.cat's meta kernel imports
        return fused          # torch._dynamo, ~0.9 s of start-up
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]))
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]))
    return fused


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Merge separate q, k, v into one `qkv` and gate, up into one `gate_up` (the layouts the
    fused families already use), so a block makes 4 matrix products instead of 7. Only plain
    nn.Linear layers are merged (not LoRA-wrapped ones)."""
    for m in model.modules():
        if isinstance(m, Attention) and not hasattr(m, "qkv") and all(is_plain_linear(getattr(m, n)) for n in "qkv"):
            m.qkv = _fused([m.q, m.k, m.v])
            del m.q, m.k, m.v
        elif isinstance(m, MLP) and m.gated and not hasattr(m, "gate_up") and \
                is_plain_linear(m.gate) and is_plain_linear(m.up):
            m.gate_up = _fused([m.gate, m.up])
            del m.gate, m.up
    return model
