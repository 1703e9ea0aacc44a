"""One attention-mask builder for every pattern: causal, prefix, sliding window and padding.

Masks are boolean, True where a query may attend to a key, shaped [B or 1, 1, Tq, Tk] for
scaled_dot_product_attention. Queries and keys are identified by their slot in the key
sequence (cache slot), so the same rules serve a full forward pass and cached decoding,
where only the rows of the new queries are built.
"""

from __future__ import annotations

import torch


def build_mask(
    q_slots: torch.Tensor,
    n_keys: int,
    *,
    causal: bool = True,
    window: int | None = None,
    prefix_len: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Allowed[b, 0, i, j] for queries at slots q_slots [Tq] and keys at slots 0..n_keys-1.

    causal:     key j <= query i.
    window:     additionally i - j < window (Mistral counts the query itself in the window).
    prefix_len: [B]; keys inside the prefix are visible to every query inside it (prefix LM).
    key_valid:  [B, n_keys]; False marks padding keys, which no query may see.
    """
    q = q_slots[:, None]
    k = torch.arange(n_keys, device=q_slots.device)[None, :]
    allowed = (k <= q) if causal else torch.ones(len(q_slots), n_keys, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # [1, 1, Tq, Tk]
    if prefix_len is not None:
        p = prefix_len.to(q.device)[:, None, None, None]
        allowed = allowed | ((k < p) & (q < p))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    # A query that may see nothing (a padding slot) sees itself, so softmax never yields NaN.
    return allowed | (k == q)[None, None]
