"""Attention that computes only what a local or sparse pattern keeps: O(n·w), not O(n²).

A sliding window (Mistral) or a Sparse Transformer band (GPT-3) lets query i see only the keys
i-w+1..i. The masked path (lmzoo.nn.masks.build_mask, then SDPA) still scores all n×n pairs and
hides most of them. Here the queries go in chunks of C, and each chunk is scored only against
the C+w keys that end with it, in one batched SDPA call over all chunks:

    keys   ....[ chunk c-1 ][ chunk c ]....
    chunk c's queries see keys (c·C - w + 1) .. (c·C + C - 1), under the exact mask of that tile.

The strided and fixed patterns also keep columns further back, which are no band:
- strided: every key a multiple of `block` back. A query's residue mod block picks them, so
  queries and keys are grouped by residue: (n/block)² scores per residue, n²/block in all.
- fixed: the last `summary` keys of every block, the same columns for every query.
Those far scores join the band's in one softmax (each key counted once: the far part takes
only keys before the band's tile). So the total is O(n·(w + n/block)) for strided and
O(n·(w + n·summary/block)) for fixed.

Every tile mask comes from the same Visibility rule as the masked path, read at the tile's own
slots, so both paths compute the same function: that is tested to 1e-5, gradients too. A tile
has to contain every key its rule lets a query see; the reach (w) and the far columns are chosen
so that it does (see plan_for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config
from .attention import sdpa
from .masks import Visibility, reach_of, with_virtual


@dataclass
class LocalPlan:
    """How one kind of layer attends over a whole sequence without an n×n mask."""

    visible: Visibility
    reach: int  # every key a query may see within `reach` slots back is in its chunk's tile
    chunk: int  # queries per chunk
    far: str | None  # None, or 'strided' / 'fixed': the pattern's columns beyond the reach
    n_virtual: int = 0  # P-tuning v2's virtual keys in front of the text keys
    dense_rows: int = 0  # queries before this slot (a prefix LM's prefix) take the masked path
    left_pad: torch.Tensor | None = None  # [B] padding slots in front of each row (fixed)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return local_attention(q, k, v, self)


def plan_for(c: Config, sparse: bool, windowed: bool, T: int, visible: Visibility, n_virtual: int,
             prefix_end: torch.Tensor | None, key_valid: torch.Tensor | None) -> LocalPlan | None:
    """The local plan for T queries at slots 0..T-1, or None where the masked path is as cheap
    (the pattern covers the whole sequence) or the padding is not left padding (a hole in a
    row would shift positions against slots, which the tiles rely on)."""
    reach, far = reach_of(c, sparse, windowed)
    if reach is None or T <= 2 * reach:
        return None
    if key_valid is not None and not bool((key_valid[:, 1:] >= key_valid[:, :-1]).all()):
        return None
    # Strided and fixed chunks are whole blocks, so a residue is the same slot within each. A band's
    # chunk of w/2 queries scores 1.5·w keys each. At 16k tokens, 12 heads, w = 256: w/4 ran the
    # forward 7% faster but forward + backward 33% slower, with 747 MB at its peak, against 560 MB
    # (backward holds the gradient of every overlapping tile); w took 476 MB, and 14% longer forward.
    chunk = reach if far else max(16, reach // 2)
    dense_rows = 0
    if prefix_end is not None:  # a prefix is read both ways, all of it: that part is dense anyway
        dense_rows = min(T, -(-int(prefix_end.max()) // chunk) * chunk)
    left_pad = None if key_valid is None else (~key_valid).sum(-1)
    return LocalPlan(visible, reach, chunk, far, n_virtual, dense_rows, left_pad)


def _tile_masks(plan: LocalPlan, q_slots, k_slots, n: int) -> torch.Tensor:
    """visible(query, key) over every tile, [B|1, n_chunks, C, C + R - 1].

    Tile slots before 0 or from n on are zeros, not keys (a padding query row past n keeps itself).
    Where the rule depends only on q - k (no padding, no prefix, no fixed blocks), the tiles after
    the first few are all alike: one is computed and copied. (Past n, causality already hides the
    zeros from every real query.) At 16k tokens that made the band 1.2x faster: building
    n·(C+R) masks took a third of its time."""
    def exact(q, k):
        return plan.visible(q, k) & (k >= 0) & ((k < n) | (k == q))

    vis = plan.visible
    first, n_chunks = -(-(plan.reach - 1) // plan.chunk), q_slots.shape[1]  # tiles that start before slot 0
    if vis.key_valid is not None or vis.prefix_end is not None or vis.pattern == "fixed" or n_chunks - first < 2:
        return exact(q_slots, k_slots)
    one = exact(q_slots[:, first:first + 1], k_slots[:, first:first + 1])
    masks = one.expand(1, n_chunks, *one.shape[2:]).clone()
    masks[:, :first] = exact(q_slots[:, :first], k_slots[:, :first])
    return masks


def _tiles(x: torch.Tensor, before: int, chunk: int, n_chunks: int) -> torch.Tensor:
    """x [B, H, n, D] as overlapping tiles [B, H, n_chunks, before + chunk, D]: tile c holds slots
    c·chunk - before .. c·chunk + chunk - 1, zeros outside 0..n-1."""
    padded = F.pad(x, (0, 0, before, n_chunks * chunk - x.shape[2]))
    return padded.unfold(2, before + chunk, chunk).transpose(-1, -2)


def local_attention(q, k, v, plan: LocalPlan) -> torch.Tensor:
    """q [B, H, n, D]; k, v [B, Hkv, P + n, D] (P virtual keys first) -> [B, H, n, D]."""
    B, H, n, D = q.shape
    P, R, C = plan.n_virtual, plan.reach, plan.chunk
    virtual = (k[:, :, :P], v[:, :, :P])
    k, v = k[:, :, P:], v[:, :, P:]
    n_chunks = -(-n // C)
    dev = q.device
    q_slots = torch.arange(n_chunks * C, device=dev).view(1, n_chunks, C, 1)
    # A tile ends with its chunk and starts R - 1 slots before it: just what the chunk's first query can see.
    tile_start = torch.arange(n_chunks, device=dev).view(1, n_chunks, 1, 1) * C - (R - 1)
    k_slots = tile_start + torch.arange(C + R - 1, device=dev)  # [1, n_chunks, 1, C + R - 1]
    near = (_tile_masks(plan, q_slots, k_slots, n), _tiles(k, R - 1, C, n_chunks), _tiles(v, R - 1, C, n_chunks))
    q_chunks = (q if n_chunks * C == n else F.pad(q, (0, 0, 0, n_chunks * C - n))).view(B, H, n_chunks, C, D)
    if plan.far == "strided":
        out = _with_strided_columns(q_chunks, near, _strided_columns(k, v, q_slots, tile_start, plan), virtual)
    else:
        shared = [(None, *virtual)]  # keys every chunk reads: the virtual ones, the fixed pattern's summaries
        if plan.far == "fixed":
            shared.append(_summary_columns(k, v, q_slots, tile_start, plan))
        out = _chunked_sdpa(q_chunks, near, shared)
    out = out.reshape(B, H, n_chunks * C, D)[:, :, :n]
    if plan.dense_rows:  # a prefix LM's prefix: those rows see the whole prefix, so take them densely
        end = plan.dense_rows
        slots = torch.arange(end, device=dev)
        allowed = with_virtual(plan.visible(slots.view(1, end, 1), slots.view(1, 1, end))[:, None], P)
        head = sdpa(q[:, :, :end], torch.cat([virtual[0], k[:, :, :end]], 2),
                    torch.cat([virtual[1], v[:, :, :end]], 2), allowed, False)
        out = torch.cat([head, out[:, :, end:]], dim=2)
    return out


def _chunked_sdpa(q_chunks, near, shared):
    """Each chunk's tile plus the shared columns, in one SDPA call: the chunks folded into the batch.
    shared: [(allowed [B|1, n_chunks, C, K] or None for always visible, keys, values [B, Hkv, K, D])]."""
    allowed, k_tiles, v_tiles = near
    B, H, n_chunks, C, D = q_chunks.shape
    Hkv = k_tiles.shape[1]

    def fold(x):  # [B, heads, n_chunks, length, D] -> [B·n_chunks, heads, length, D]
        return x.transpose(1, 2).reshape(B * n_chunks, x.shape[1], x.shape[3], D)

    masks, keys, values = [allowed], [fold(k_tiles)], [fold(v_tiles)]
    for columns, k, v in shared:
        K = k.shape[2]
        if K:
            masks.insert(0, torch.ones(1, n_chunks, C, K, dtype=torch.bool, device=k.device)
                         if columns is None else columns)
            keys.insert(0, fold(k[:, :, None].expand(B, Hkv, n_chunks, K, D)))
            values.insert(0, fold(v[:, :, None].expand(B, Hkv, n_chunks, K, D)))
    def joined(parts, dim=-2):  # a lone tile stays a view of k or v: no copy of the keys
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    mask = joined([m.expand(B, n_chunks, C, m.shape[-1]) for m in masks], -1)
    mask = mask.reshape(B * n_chunks, 1, C, mask.shape[-1])
    out = sdpa(fold(q_chunks), joined(keys), joined(values), mask, False)
    return out.view(B, n_chunks, H, C, D).transpose(1, 2)


def _strided_columns(k, v, q_slots, tile_start, plan: LocalPlan):
    """(allowed, keys, values) of the strided columns before each chunk's tile: keys and values
    [B, Hkv, n_chunks(j), C(r), D]; query r of chunk c reads key (j, r) for j < c - 1."""
    C, n_chunks = plan.chunk, q_slots.shape[1]
    B, Hkv, n, D = k.shape
    blocks = [F.pad(x, (0, 0, 0, n_chunks * C - n)).view(B, Hkv, n_chunks, C, D) for x in (k, v)]
    j = torch.arange(n_chunks, device=k.device).view(1, 1, 1, n_chunks)
    k_slots = j * C + q_slots % C  # [1, n_chunks(c), C(r), n_chunks(j)]
    return plan.visible(q_slots, k_slots) & (k_slots < tile_start), blocks[0], blocks[1]


def _summary_columns(k, v, q_slots, tile_start, plan: LocalPlan):
    """(allowed, keys, values) of the fixed pattern's summary columns before each chunk's tile:
    the last `summary` positions of every block, [B, Hkv, n_chunks·summary, D]. Positions skip
    padding, so each row's summary columns sit at residues shifted by its left padding."""
    C, n_chunks, S = plan.chunk, q_slots.shape[1], plan.visible.summary
    B, Hkv, n, D = k.shape
    dev = k.device
    pad = plan.left_pad if plan.left_pad is not None else torch.zeros(1, dtype=torch.long, device=dev)
    residues = (pad[:, None] + C - S + torch.arange(S, device=dev)) % C  # [B|1, S]
    index = residues.view(-1, 1, 1, S, 1).expand(B, Hkv, n_chunks, S, D)
    keys, values = (F.pad(x, (0, 0, 0, n_chunks * C - n)).view(B, Hkv, n_chunks, C, D).gather(3, index)
                    .reshape(B, Hkv, n_chunks * S, D) for x in (k, v))
    k_slots = torch.arange(n_chunks, device=dev).view(1, n_chunks, 1) * C + residues[:, None, :]
    k_slots = k_slots.view(-1, 1, 1, n_chunks * S)
    return plan.visible(q_slots, k_slots) & (k_slots < tile_start), keys, values


def _with_strided_columns(q_chunks, near, far, virtual):
    """Tile + strided columns (+ virtual keys) in one softmax, as products: the strided columns
    differ per query (by residue), so no SDPA call can join them to the tile."""
    B, H, n_chunks, C, D = q_chunks.shape
    near_allowed, k_tiles, v_tiles = near
    far_allowed, far_k, far_v = far
    Hkv = k_tiles.shape[1]
    q = q_chunks.reshape(B, Hkv, H // Hkv, n_chunks, C, D) * D ** -0.5
    parts = [
        (torch.einsum("bhgncd,bhpd->bhgncp", q, virtual[0]), None),
        (torch.einsum("bhgncd,bhnkd->bhgnck", q, k_tiles), near_allowed),
        (torch.einsum("bhgcrd,bhjrd->bhgcrj", q, far_k), far_allowed),
    ]
    scores = torch.cat([s.float() if a is None else s.float().masked_fill(~a[:, None, None], float("-inf"))
                        for s, a in parts], dim=-1)
    weights = scores.softmax(-1).to(v_tiles.dtype)  # every row keeps its own key: never all -inf
    w_virtual, w_near, w_far = weights.split([s.shape[-1] for s, _ in parts], dim=-1)
    out = (torch.einsum("bhgncp,bhpd->bhgncd", w_virtual, virtual[1])
           + torch.einsum("bhgnck,bhnkd->bhgncd", w_near, v_tiles)
           + torch.einsum("bhgcrj,bhjrd->bhgcrd", w_far, far_v))
    return out.reshape(B, H, n_chunks, C, D)
