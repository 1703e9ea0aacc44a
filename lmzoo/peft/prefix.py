"""Virtual tokens: prompt tuning / P-tuning v1 (shallow) and P-tuning v2 (deep prefix tuning).

Prompt tuning learns P embeddings placed in front of the text at the input layer only; the
decoder treats them as tokens. P-tuning v1 reparameterises them through an MLP or an LSTM.
P-tuning v2 learns, for every layer, P keys and values per key/value head, which each
layer's attention sees before the text (never rotated, always visible). A PrefixEncoder
makes them: an embedding, optionally followed by THUDM's projection MLP (Linear, tanh,
Linear). Attach one with `add_virtual(model, ...)`; the decoder does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LmzooError


@dataclass
class PrefixConfig:
    """P-tuning v2."""

    n_virtual: int = 32
    projection: bool = False  # THUDM's prefix_projection: Embedding(P, d) -> Linear -> tanh -> Linear
    encoder_hidden: int | None = None  # hidden width of the projection (default: d_model)
    dropout: float = 0.0
    # Where the text's positions start: "after" the virtual tokens (PEFT's convention, the
    # default) or at "zero" (ChatGLM's P-tuning v2 code).
    text_positions: str = "after"
    # "tokens": start from the keys/values the model itself makes for P random tokens, so the
    # untrained prefix reads like real text (Li & Liang's advice); "random": N(0, 1) as PEFT.
    # The projection MLP always starts random.
    init: str = "tokens"


@dataclass
class PromptConfig:
    """Prompt tuning (reparam=None) and P-tuning v1 (reparam='mlp' or 'lstm')."""

    n_virtual: int = 20
    reparam: str | None = None
    encoder_hidden: int | None = None
    init: str = "vocab"  # "vocab": start from random token embeddings; "random": N(0, 1) as PEFT


def _check_n(n: int) -> None:
    if n < 1:
        raise LmzooError(f"the number of virtual tokens must be >= 1, got {n}")


class PrefixEncoder(nn.Module):
    kind = "prefix"

    def __init__(self, model, cfg: PrefixConfig):
        super().__init__()
        _check_n(cfg.n_virtual)
        if cfg.text_positions not in ("after", "zero"):
            raise LmzooError(f"text_positions={cfg.text_positions!r}: choose 'after' or 'zero'")
        c = model.config
        self.n_virtual, self.text_positions, self.cfg = cfg.n_virtual, cfg.text_positions, cfg
        self.n_layers, self.n_kv, self.head_dim = c.n_layers, c.kv_heads, c.head_size
        width = c.n_layers * 2 * c.kv_heads * c.head_size  # PEFT's layout: [layer, k|v, kv head, dim]
        if cfg.projection:
            hidden = cfg.encoder_hidden or c.d_model
            self.embedding = nn.Embedding(cfg.n_virtual, c.d_model)
            self.transform = nn.Sequential(nn.Linear(c.d_model, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(cfg.n_virtual, width)
            self.transform = None
        self.dropout = nn.Dropout(cfg.dropout)

    def flat(self) -> torch.Tensor:
        """[P, n_layers * 2 * n_kv * head_dim]: what PEFT saves as prompt_embeddings."""
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each [batch, n_kv, P, head_dim]."""
        x = self.dropout(self.flat())
        x = x.view(self.n_virtual, 2 * self.n_layers, self.n_kv, self.head_dim).permute(1, 2, 0, 3)
        return [(x[2 * i].expand(batch, -1, -1, -1), x[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(self.n_layers)]


class PromptEncoder(nn.Module):
    kind = "prompt"

    def __init__(self, model, cfg: PromptConfig):
        super().__init__()
        _check_n(cfg.n_virtual)
        if cfg.reparam not in (None, "mlp", "lstm"):
            raise LmzooError(f"reparam={cfg.reparam!r}: choose none, mlp or lstm")
        d = model.config.d_model
        self.n_virtual, self.cfg = cfg.n_virtual, cfg
        self.embedding = nn.Embedding(cfg.n_virtual, d)
        if cfg.init == "vocab":  # the prompt-tuning paper: start from real token embeddings
            rows = torch.randint(0, model.config.vocab_size, (cfg.n_virtual,))
            with torch.no_grad():
                self.embedding.weight.copy_(model.tok_emb.weight[rows].float())
        hidden = cfg.encoder_hidden or d
        self.lstm = None
        if cfg.reparam == "lstm":  # P-tuning v1: a bidirectional LSTM, then an MLP head
            self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
        elif cfg.reparam == "mlp":
            self.head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, d))
        else:
            self.head = None

    def flat(self) -> torch.Tensor:
        """[P, d_model]: the virtual token embeddings (what PEFT saves as prompt_embeddings)."""
        x = self.embedding.weight
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]
        return self.head(x) if self.head is not None else x

    def prepend(self, x, attention_mask, position_ids, prefix_len):
        """The text's embeddings [B, T, d] with the virtual ones in front; masks and positions
        grow to match (virtual tokens take positions 0..P-1, the text follows)."""
        B, P = x.shape[0], self.n_virtual
        x = torch.cat([self.flat().to(x.dtype).expand(B, -1, -1), x], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if position_ids is not None:
            front = torch.arange(P, device=x.device).expand(B, P)
            position_ids = torch.cat([front, position_ids + P], dim=1)
        if prefix_len is not None:
            prefix_len = torch.as_tensor(prefix_len, device=x.device) + P
        return x, attention_mask, position_ids, prefix_len


def add_virtual(model, cfg: PrefixConfig | PromptConfig) -> nn.Module:
    """Attach a prompt or prefix encoder and freeze the backbone; returns the encoder."""
    if getattr(model, "lora_config", None) is not None or model.virtual is not None:
        raise LmzooError("this model already has an adapter; attach one kind at a time")
    encoder = PrefixEncoder(model, cfg) if isinstance(cfg, PrefixConfig) else PromptEncoder(model, cfg)
    if isinstance(cfg, PrefixConfig) and cfg.init == "tokens" and not cfg.projection:
        _init_from_tokens(model, encoder)
    p = model.tok_emb.weight
    for param in model.parameters():
        param.requires_grad = False
    model.virtual = encoder.to(device=p.device)
    return encoder


@torch.no_grad()
def _init_from_tokens(model, encoder: PrefixEncoder, ids: torch.Tensor | None = None) -> None:
    """Fill the prefix with the cached keys/values of P tokens (random by default) at
    positions 0..P-1: the model then reads the text as if those tokens came before it."""
    P = encoder.n_virtual
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (1, P), device=model.tok_emb.weight.device)
    attached, model.virtual = model.virtual, None  # the plain model reads the tokens
    cache = model.new_cache(1, P, rolling=False)  # read back in slot order
    model(ids, cache=cache)
    model.virtual = attached
    kv = torch.stack([t[0, :, :P] for layer in range(model.config.n_layers)
                      for t in (cache.k[layer], cache.v[layer])])  # [2L, n_kv, P, head_dim]
    encoder.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(P, -1).float())
