"""The linear layer, with its fp32 matrix products on a CPU done by oneDNN rather than MKL.

nn.Linear's products go to MKL's sgemm. On this project's 2-core AMD EPYC, oneDNN (PyTorch's
other CPU matmul library) is 8-10% faster for the products a training step makes ([1024, 576]
or [1024, 1536] inputs, the SmolLM2 layers' weights), in both directions:
    x W^T (forward)                  220-224 GFLOP/s against MKL's 203-207
    g W (the gradient for x)         220-229 against 199-208
    the head, [256, 576] x [576, 49152] chunks: 175 against 150, and 192 against 183
The weight's gradient g^T x stays with MKL, faster there (194-199 against oneDNN's 170-200).
With frozen weights (LoRA, P-tuning v2) the first two are nearly all of a step's products: the
P-tuning v2 step's products took 2.67 s instead of 2.96 s.

oneDNN reads the weight where it lies (W for x W^T, W.t() for g W): no packed copy, no extra
memory. The sums are the same in another order: outputs differ from F.linear by fp32 rounding
(~4e-6 relative on SmolLM2's logits). Anything else (bf16, which already goes to oneDNN; CUDA;
autocast; sharded or traced tensors; a compiled graph) takes F.linear unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain_fp32_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and type(t) in (torch.Tensor, nn.Parameter)


def uses_onednn(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of `a` with a 2-D `weight` takes oneDNN: fp32 on a CPU, plain tensors
    (not sharded or traced ones), a contiguous weight, outside autocast and compiled graphs."""
    return (ONEDNN and _plain_fp32_cpu(a) and _plain_fp32_cpu(weight) and weight.dim() == 2
            and weight.is_contiguous() and a.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _forward_on_onednn(x, weight, bias) -> bool:
    # a mismatched shape goes to F.linear, for its error message
    return uses_onednn(x, weight) and x.shape[-1] == weight.shape[1] and (bias is None or _plain_fp32_cpu(bias))


def onednn_linear(a: torch.Tensor, weight_as_linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a W^T + b on oneDNN, for a plain or an oneDNN-packed (lmzoo.infer.prepare.PackedLinear) W."""
    return torch.ops.mkldnn._linear_pointwise(a, weight_as_linear, bias, "none", [None], "")


def x_wt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, as F.linear, for the inside of autograd Functions (no graph is recorded)."""
    return onednn_linear(x, weight, bias) if _forward_on_onednn(x, weight, bias) else F.linear(x, weight, bias)


def g_w(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g W: the gradient of x W^T for x, given the output's gradient g [..., out]."""
    if uses_onednn(g, weight) and g.shape[-1] == weight.shape[0]:
        return onednn_linear(g, weight.t())
    return g @ weight


class _OneDnnLinear(torch.autograd.Function):
    """F.linear with its x W^T and g W products on oneDNN (`g_w`); the weight's gradient
    g^T x and the bias's as autograd computes them."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return onednn_linear(x, weight, bias)  # `linear` checked that oneDNN takes it

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        return (g_w(g, weight) if need_x else None,
                g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None,
                g2.sum(0) if need_b else None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on oneDNN where `uses_onednn` says so."""
    if not _forward_on_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDnnLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose products run through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear or this module's Linear, not a subclass that changes what it computes (LoRA)."""
    return type(module) in (nn.Linear, Linear)
