"""The feed-forward sublayer: GELU MLP (GPT), SwiGLU (Llama and later, gate|up fused or not),
and a sparse mixture of SwiGLU experts (Mixtral)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config

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
            self.gate_up = nn.Linear(c.d_model, 2 * c.d_ff, bias=c.mlp_bias)
        elif self.gated:
            self.gate = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
            self.up = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        else:
            self.up = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down(self.act(self.up(x)))
        if hasattr(self, "gate_up"):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(self.act(gate) * up)


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
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        self.aux_loss = load_balancing_loss(probs, chosen) if self.training else None
        return out.reshape(shape)


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_e (share of routings to e) * (mean prob of e):
    1.0 when the load is uniform, larger when a few experts take most tokens."""
    n_experts = probs.shape[-1]
    share = F.one_hot(chosen, n_experts).float().mean(dim=(0, 1))
    return n_experts * (share * probs.mean(0)).sum()
