"""One rule for which keys a query may see, for every pattern: causal, prefix, sliding window, the
Sparse Transformer's banded/strided/fixed patterns, padding and virtual (P-tuning) tokens.

Queries and keys are identified by their slot in the key sequence (the cache slot), so the same
rule serves a full forward pass, cached decoding (only the new queries' rows), the chunks of the
sparse attention path (lmzoo.nn.local_attention: only the keys near each chunk) and a rolling
cache (keys in ring order). `Visibility` answers for any slots; `build_mask` is the dense
[B|1, 1, Tq, Tk] boolean mask for scaled_dot_product_attention, True where a query may attend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import LmzooError

PATTERNS = ("dense", "banded", "strided", "fixed")


def pattern_rule(q: torch.Tensor, k: torch.Tensor, pattern: str, block: int, summary: int) -> torch.Tensor:
    """Which (query i, key j) pairs a Sparse Transformer pattern keeps, before causality.

    banded:  j within the last `block` positions (a local band).
    strided: banded, plus every key a multiple of `block` back (i - j) % block == 0.
    fixed:   keys in the query's own block, plus the last `summary` keys of every block.
    """
    if pattern == "banded":
        return q - k < block
    if pattern == "strided":
        return (q - k < block) | ((q - k) % block == 0)
    if pattern == "fixed":
        return (q // block == k // block) | (k % block >= block - summary)
    raise LmzooError(f"unknown attention pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")


def _at(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """table [B, n] read at slots [B|1, ...] (clamped into range), shaped [B, ...]."""
    B = table.shape[0]
    index = slots.clamp(0, table.shape[1] - 1).expand(B, *slots.shape[1:])
    return table.gather(1, index.reshape(B, -1)).view(index.shape)


@dataclass
class Visibility:
    """May the query at slot q see the key at slot k? One kind of layer's rules.

    causal:     key j <= query i.
    window:     additionally i - j < window (Mistral counts the query itself in the window).
    pattern:    a Sparse Transformer pattern (see pattern_rule), on top of causality; it counts
                positions, which skip padding.
    prefix_end: [B] slot where each row's prefix ends; keys before it are visible to every
                query before it (prefix LM).
    key_valid:  [B, n]; False marks padding keys, which no query may see.
    A query that may see nothing (a padding slot) sees itself, so a softmax never yields NaN.
    """

    causal: bool = True
    window: int | None = None
    pattern: str = "dense"
    block: int = 128
    summary: int = 8
    prefix_end: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise LmzooError(f"window={self.window}: a sliding window must be >= 1")
        if self.block < 1:
            raise LmzooError(f"stride/block={self.block}: must be >= 1")
        if self.pattern == "fixed" and not 0 < self.summary <= self.block:
            raise LmzooError(f"summary={self.summary}: the fixed pattern needs 1 <= summary <= block={self.block}")
        if self.pattern not in PATTERNS:
            raise LmzooError(f"unknown attention pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        self.positions = None
        if self.key_valid is not None and self.pattern != "dense":
            # blocks and strides are counted in positions, which skip the padding
            self.positions = self.key_valid.long().cumsum(-1) - 1

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """allowed for integer slot tensors q and k that broadcast together, batch first (B or 1)."""
        allowed = (k <= q) if self.causal else torch.ones_like(k - q, dtype=torch.bool)
        if self.window is not None:
            allowed = allowed & (q - k < self.window)
        if self.pattern != "dense":
            qp, kp = (q, k) if self.positions is None else (_at(self.positions, q), _at(self.positions, k))
            allowed = allowed & pattern_rule(qp, kp, self.pattern, self.block, self.summary)
        if self.prefix_end is not None:
            p = self.prefix_end.view(-1, *[1] * (allowed.dim() - 1))
            allowed = allowed | ((k < p) & (q < p))
        if self.key_valid is not None:
            allowed = allowed & _at(self.key_valid, k)
        return allowed | (k == q)


def reach_of(c: Config, sparse: bool, windowed: bool) -> tuple[int | None, str | None]:
    """(reach, far) of a kind of layer: keys more than `reach` slots back are visible only
    through the far columns of a strided or fixed pattern; reach None: every key may be seen."""
    reach = c.sliding_window if windowed else None
    if not sparse or c.attention_pattern == "dense":
        return reach, None
    if c.attention_pattern == "banded":
        return min(reach or c.sparse_block, c.sparse_block), None
    if reach is not None and reach <= c.sparse_block:
        return reach, None  # the window hides the far columns too
    return c.sparse_block, c.attention_pattern


def with_virtual(allowed: torch.Tensor, n_virtual: int) -> torch.Tensor:
    """P-tuning v2's virtual tokens: that many key columns in front, visible to every query."""
    if not n_virtual:
        return allowed
    virtual = torch.ones(*allowed.shape[:-1], n_virtual, dtype=torch.bool, device=allowed.device)
    return torch.cat([virtual, allowed], dim=-1)


def build_mask(q_slots: torch.Tensor, n_keys: int, *, n_virtual: int = 0, **rules) -> torch.Tensor:
    """Allowed[b, 0, i, j] for queries at slots q_slots [Tq] and keys at slots 0..n_keys-1, plus
    n_virtual always-visible columns in front; `rules` are Visibility's fields."""
    visible = Visibility(**rules)
    k = torch.arange(n_keys, device=q_slots.device)
    return with_virtual(visible(q_slots[None, :, None], k[None, None, :])[:, None], n_virtual)


def prefix_end_slots(prefix_len: torch.Tensor, key_valid: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """Turn per-row prefix lengths (in real tokens) into slot boundaries, skipping padding."""
    if key_valid is None:
        return prefix_len
    seen = key_valid.long().cumsum(-1)
    return (seen <= prefix_len[:, None]).sum(-1)
