"""The feed-forward sublayer: GELU MLP (GPT) or SwiGLU (Llama and later), gate|up fused or not."""

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
