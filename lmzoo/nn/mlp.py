"""The feed-forward sublayer: GELU MLP (GPT), SwiGLU (Llama and later, gate|up fused or not),
and a sparse mixture of SwiGLU experts (Mixtral)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .linear import Linear
from .recompute import recomputed

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.act = ACTIVATIONS[c.activation]
        self.gated = c.mlp == "swiglu"
        if self.gated and c.fused_gate_up:
            # ChatGLM's dense_h_to_4h: one matrix, first half gate, second half up.
            self.gate_up = Linear(c.d_model, 2 * c.d_ff, bias=c.mlp_bias)
        elif self.gated:
            self.gate = Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
            self.up = Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        else:
            self.up = Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down = Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            up = self.up(x)
            h = self.act(up)
            with recomputed(h, lambda: self.act(up)):  # the activation keeps its input anyway
                return self.down(h)
        if hasattr(self, "gate_up"):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            h = Gated.apply(gate, up, self.act)
            with recomputed(h, lambda: gated(gate, up, self.act)):  # Gated keeps gate and up anyway
                return self.down(h)
        return self.down(gated(gate, up, self.act))


def gated(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """SwiGLU's act(gate) * up; act(gate) is a fresh tensor, so the product needs no second one."""
    return act(gate).mul_(up)


class Gated(torch.autograd.Function):
    """act(gate) * up, saving only gate and up for backward: act(gate) is recomputed there
    (one cheap elementwise op) instead of being held for every layer, which saves a
    [tokens, d_ff] tensor per layer against plain autograd (it keeps gate, up and act(gate))."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return gated(gate, up, act)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(gate)
        grad_up = grad * a.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(a, gate, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None


class MoE(nn.Module):
    """Mixtral's sparse MoE: a router scores every expert, each token goes to its top-k, and
    the chosen experts' outputs are mixed by the renormalised router probabilities."""

    def __init__(self, c: Config):
        super().__init__()
        self.top_k = c.experts_per_token
        self.router = nn.Linear(c.d_model, c.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c) for _ in range(c.n_experts))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            # eagerly an expert no token chose is skipped; a traced step cannot ask (the count is data)
            if torch.compiler.is_compiling() or token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        self.aux_loss = load_balancing_loss(probs, chosen) if self.training else None
        return out.reshape(shape)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_e (share of routings to e) * (mean prob of e):
    1.0 when the load is uniform, larger when a few experts take most tokens."""
    n_experts = probs.shape[-1]
    share = F.one_hot(chosen, n_experts).float().mean(dim=(0, 1))
    return n_experts * (share * probs.mean(0)).sum()
