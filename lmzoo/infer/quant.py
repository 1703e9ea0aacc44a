"""Weight-only quantized linear layers for inference: int8 per output channel, int4 per group.

Decoding one token reads every weight once, so its speed is bytes moved: an int8 weight moves
a quarter of fp32's bytes, an int4 weight an eighth. The activations stay floating point; the
matrix products run in torch's own CPU/CUDA kernels for packed weights
(`_weight_int8pack_mm`, `_weight_int4pack_mm*`), which take bf16 activations. Layers compute
in bf16 and hand back the caller's dtype, so the rest of the model is unchanged.

    quantize(model, "int8")            # every nn.Linear of the blocks and the head, in place
    quantize(model, "int4", group_size=32)

int8:  w ~= q * scale,              q in -127..127, one scale per output row (symmetric).
int4:  w ~= (q - 8) * scale + zero, q in 0..15, one (scale, zero) per row and group of
       `group_size` input columns (asymmetric min/max, as GGUF's Q4_1 blocks of 32).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LmzooError
from ..nn.linear import is_plain_linear
from .fuse import fuse_projections

MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [out, in] and an fp scale per output row."""

    def __init__(self, linear: nn.Linear, compute_dtype=torch.bfloat16, *, parts=None):
        """From a float nn.Linear, or from `parts` = (qweight int8 [n, k], scale [n], bias or None),
        quantized already (row by row: a large matrix can be quantized in chunks of rows)."""
        super().__init__()
        if parts is None:
            qweight, scale = int8_rows(linear.weight.detach())
        else:
            qweight, scale, bias = parts
            linear = _Bias(bias)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.compute_dtype), self.qweight, self.scale)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a float matrix -> (int8 values, one symmetric scale per row)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class _Bias:
    def __init__(self, bias):
        self.bias = bias


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4-bit groups of `group_size` input columns, packed for the kernel."""

    def __init__(self, linear: nn.Linear | None, group_size: int = 32, compute_dtype=torch.bfloat16, *, parts=None):
        """From a float nn.Linear (min/max per group), or from `parts` = (q int [n, k] in 0..15, or
        a CPU-packed [n, k/2] uint8 tensor, scale [n, k/gs], zero [n, k/gs], bias or None) already
        quantized (a GGUF file's Q4 blocks). The CPU packing interleaves rows within blocks of 64, so
        packed pieces concatenate when each has a multiple of 64 rows."""
        super().__init__()
        packed = None
        if parts is not None and parts[0].dtype == torch.uint8:  # packed already (CPU layout)
            packed, scale, zero, bias = parts
            (n, half_k), device = packed.shape, packed.device
            k = 2 * half_k
        elif parts is None:
            n, k = linear.out_features, linear.in_features
            if k % group_size:
                raise LmzooError(f"int4: in_features={k} is not a multiple of group_size={group_size}")
            w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
            lo, hi = w.amin(-1), w.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
            bias, device = linear.bias, linear.weight.device
        else:
            q, scale, zero, bias = parts
            (n, k), device = q.shape, q.device
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1)
                             .transpose(0, 1).contiguous().to(compute_dtype))  # [k/gs, n, 2]
        self.register_buffer("packed", packed if packed is not None else _pack_int4(q.to(torch.int32), device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] as the kernel reads it (rounded to bf16): the product with the
        identity. The packed layout is the kernel's own, so the kernel is what unpacks it."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        return self._matmul(eye).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]).to(self.compute_dtype))
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type != self.packed.device.type:  # the packed layout is the device's own
            raise LmzooError(f"int4 weights packed on {self.packed.device.type} cannot run on {x2.device.type}: "
                             "move the model first, then quantize")
        if x2.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)


def cuda_inner_k_tiles(k: int) -> int:
    """CUDA's int4 kernel reads the input dimension in tiles of 16 * inner_k_tiles (2, 4 or 8)
    columns, so k must be a multiple of one of them: the largest is fastest. (SmolLM2's
    576 = 9 * 64 takes 4; assuming 8 made packing fail on CUDA.)"""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise LmzooError(f"int4 on CUDA: in_features={k} is not a multiple of 32")


def _pack_int4(q: torch.Tensor, device) -> torch.Tensor:
    if device is not None and torch.device(device).type == "cuda":
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device)
        return torch.ops.aten._convert_weight_to_int4pack(packed, cuda_inner_k_tiles(q.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 8)


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8", *, group_size: int = 32, head: bool = True) -> nn.Module:
    """Replace the plain nn.Linear layers of `model` (the blocks' projections, and the head unless
    head=False; in int4 mode the head gets int8) by int8 or int4 weight-only layers, in place;
    embeddings and norms stay as they are (a tied head gets its own quantized copy). For
    inference: the quantized layers have no trainable weights. Attach and merge LoRA before
    quantizing, not after."""
    if mode not in MODES:
        raise LmzooError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    fuse_projections(model)
    targets = [(name, m) for name, m in model.named_modules() if is_plain_linear(m)]
    for name, linear in targets:
        if name == "lm_head" and not head:
            continue
        if name.endswith("router"):  # MoE routing scores decide which experts run: keep them exact
            continue
        # The head picks the next token from 49k close scores: 4 bits there cost 6% perplexity,
        # so int4 keeps it at 8 bits, as GGUF's 4-bit files keep their output matrix at 8.
        four_bit = mode == "int4" and name != "lm_head"
        new = Int4Linear(linear, group_size) if four_bit else Int8Linear(linear)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.quantized = mode
    return model
