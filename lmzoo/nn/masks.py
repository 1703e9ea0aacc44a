"""One attention-mask builder for every pattern: causal, prefix, sliding window, the Sparse
Transformer's banded/strided/fixed patterns, padding and virtual (P-tuning) tokens.

Masks are boolean, True where a query may attend to a key, shaped [B or 1, 1, Tq, Tk] for
scaled_dot_product_attention. Queries and keys are identified by their slot in the key
sequence (the cache slot), so the same rules serve a full forward pass and cached decoding,
where only the rows of the new queries are built.
"""

from __future__ import annotations

import torch

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


def build_mask(
    q_slots: torch.Tensor,
    n_keys: int,
    *,
    causal: bool = True,
    window: int | None = None,
    pattern: str = "dense",
    block: int = 128,
    summary: int = 8,
    prefix_end: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    n_virtual: int = 0,
) -> torch.Tensor:
    """Allowed[b, 0, i, j] for queries at slots q_slots [Tq] and keys at slots 0..n_keys-1.

    causal:     key j <= query i.
    window:     additionally i - j < window (Mistral counts the query itself in the window).
    pattern:    a Sparse Transformer pattern (see pattern_rule), on top of causality.
    prefix_end: [B] slot where each row's prefix ends; keys before it are visible to every
                query before it (prefix LM).
    key_valid:  [B, n_keys]; False marks padding keys, which no query may see.
    n_virtual:  P-tuning v2's virtual tokens: that many extra key columns in front, always visible.
    """
    if window is not None and window < 1:
        raise LmzooError(f"window={window}: a sliding window must be >= 1")
    if block < 1:
        raise LmzooError(f"stride/block={block}: must be >= 1")
    if pattern == "fixed" and not 0 < summary <= block:
        raise LmzooError(f"summary={summary}: the fixed pattern needs 1 <= summary <= block={block}")
    q = q_slots[:, None]
    k = torch.arange(n_keys, device=q_slots.device)[None, :]
    allowed = (k <= q) if causal else torch.ones(len(q_slots), n_keys, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # [1, 1, Tq, Tk]
    if pattern != "dense":
        qp, kp = q, k
        if key_valid is not None:  # blocks are counted in positions, which skip the padding
            kp = key_valid.long().cumsum(-1) - 1
            qp, kp = kp[:, q_slots][:, :, None], kp[:, None, :]
        allowed = allowed & pattern_rule(qp, kp, pattern, block, summary).reshape(-1, 1, len(q_slots), n_keys)
    if prefix_end is not None:
        p = prefix_end.to(q.device)[:, None, None, None]
        allowed = allowed | ((k < p) & (q < p))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    # A query that may see nothing (a padding slot) sees itself, so softmax never yields NaN.
    allowed = allowed | (k == q)[None, None]
    if n_virtual:
        virtual = torch.ones(*allowed.shape[:3], n_virtual, dtype=torch.bool, device=q.device)
        allowed = torch.cat([virtual, allowed], dim=-1)
    return allowed


def prefix_end_slots(prefix_len: torch.Tensor, key_valid: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """Turn per-row prefix lengths (in real tokens) into slot boundaries, skipping padding."""
    if key_valid is None:
        return prefix_len
    seen = key_valid.long().cumsum(-1)
    return (seen <= prefix_len[:, None]).sum(-1)
