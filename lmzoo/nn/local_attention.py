"""Attention that computes only what a local or sparse pattern keeps: O(n·w), not O(n²).

A sliding window (Mistral) or a Sparse Transformer band (GPT-3) lets query i see only the keys
i-w+1..i. The masked path (lmzoo.nn.masks.build_mask, then SDPA) still scores all n×n pairs and
hides most of them. Here the queries go in chunks of C, and each chunk is scored only against
the C+w-1 keys that end with it, in one batched SDPA call over many chunks:

    keys   ....[ chunk c-1 ][ chunk c ]....
    chunk c's queries see keys (c·C - w + 1) .. (c·C + C - 1), under one mask shared by every tile.

The tiles are views of the keys (overlapping windows, no copy), and one [C, C+w-1] mask serves
every chunk: within a row's real tokens the rule depends only on positions relative to the chunk.
Around that middle, each row has
- its left padding: a padding query sees only itself (and virtual keys), so it is scored alone;
- the head, attended densely under the full rule: the first w-1 or so queries (whose band would
  reach before the first key), and a prefix LM's prefix (read both ways, all of it: dense anyway;
  a prefix also takes in the row's padding, which sees it);
- the tail, densely too: the last queries that do not fill a chunk.

The strided and fixed patterns also keep columns further back, which are no band:
- strided: every key a multiple of `block` back. A query's residue mod block picks them, so
  queries and keys are grouped by residue: (n/block)² scores per residue, n²/block in all.
- fixed: the last `summary` keys of every block, the same columns for every query.
Those far scores join the band's in one softmax (each key counted once: the far part takes
only keys before the band's tile). So the total is O(n·(w + n/block)) for strided and
O(n·(w + n·summary/block)) for fixed.

Memory: every row's padding, head, groups of chunks and tail are spans of one InGroups call, which
runs them in turn, and backward recomputes one span's scores at a time. So what it holds beyond
the inputs, the output and their gradients is one span's tiles, not n·(C+w) gradients of
overlapping tiles.

Every mask comes from the same Visibility rule as the masked path, so both paths compute the
same function: that is tested to 1e-5, gradients too. A tile has to contain every key its rule
lets a query see; the reach (w) and the far columns are chosen so that it does (see plan_for).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import Config
from .attention import sdpa
from .masks import Visibility, reach_of, with_virtual

# Queries per group of chunks: a group's tiles, their gradients and the strided pattern's scores
# stay a few tens of MB at 12 heads (and the SDPA calls stay long enough to keep both cores busy).
GROUP_QUERIES = 1024


@dataclass
class LocalPlan:
    """How one kind of layer attends over a whole sequence without an n×n mask."""

    visible: Visibility
    reach: int  # every key a query may see within `reach` slots back is in its chunk's tile
    chunk: int  # queries per chunk
    far: str | None  # None, or 'strided' / 'fixed': the pattern's columns beyond the reach
    n_virtual: int = 0  # P-tuning v2's virtual keys in front of the text keys
    left_pad: list[int] | None = None  # padding slots in front of each row
    prefix_end: list[int] | None = None  # each row's prefix ends before this slot (a prefix LM)

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
    # chunk is small: its tile of C + w - 1 keys wastes C - 1 of them per query. At 16k tokens, 12 heads,
    # w = 256, SDPA over the tiles alone took 109-115 ms for C = 16..64 and 130 for 128 (smaller chunks:
    # less waste, but SDPA's CPU kernel is slower per score on short query blocks); forward + backward
    # took 757 ms at C = 64, 813 at 32 (backward writes a gradient for every overlapping tile).
    chunk = reach if far else max(16, reach // 4)
    if visible.pattern == "fixed":  # its blocks count from position 0: a chunk is whole blocks, so every tile is alike
        chunk = -(-chunk // visible.block) * visible.block
    # As lists, read once here: every layer of this kind splits its rows by them.
    left_pad = None if key_valid is None else (~key_valid).sum(-1).tolist()
    return LocalPlan(visible, reach, chunk, far, n_virtual, left_pad,
                     None if prefix_end is None else prefix_end.tolist())  # [B]: one per row


def local_attention(q, k, v, plan: LocalPlan) -> torch.Tensor:
    """q [B, H, n, D]; k, v [B, Hkv, P + n, D] (P virtual keys first) -> [B, H, n, D]."""
    B, n = q.shape[0], q.shape[2]
    C, P = plan.chunk, plan.n_virtual
    pad = plan.left_pad or [0] * B
    spans = [span for b in range(B) for span in _row_spans(plan, n, b, pad[b], (plan.prefix_end or [0] * B)[b])]
    rule = replace(plan.visible, prefix_end=None, key_valid=None)  # past the padding and the prefix

    def run(span, q_g, k_g, v_g, virtual_k, virtual_v, *far):
        b, q_lo, q_hi, k_lo, k_hi, kind = span
        virtual_k, virtual_v = virtual_k[b:b + 1], virtual_v[b:b + 1]
        if kind == "padding":  # a padding query sees itself and the virtual keys (as the rule says), nothing else
            def each(x):  # [1, heads, m, D] -> [m, heads, 1, D]: one query or key per batch item
                return x.squeeze(0).transpose(0, 1).unsqueeze(2)

            keys, values = ([x.squeeze(0).expand(q_hi - q_lo, *x.shape[1:]), each(own)]
                            for x, own in ((virtual_k, k_g), (virtual_v, v_g)))
            out = sdpa(each(q_g), torch.cat(keys, 2), torch.cat(values, 2), None, False)
            return out.squeeze(2).transpose(0, 1).unsqueeze(0)
        if kind is None:  # under the full rule: prefix and all (keys from the row's first real token)
            q_slots = torch.arange(q_lo, q_hi, device=q.device).view(1, -1, 1)
            allowed = plan.visible(q_slots, torch.arange(k_lo - P, k_hi - P, device=q.device).view(1, 1, -1))
            allowed = with_virtual(allowed[b:b + 1, None] if allowed.shape[0] > 1 else allowed[:, None], P)
            return sdpa(q_g, torch.cat([virtual_k, k_g], 2), torch.cat([virtual_v, v_g], 2), allowed, False)
        # the far columns of this row, from its first real token: every key (strided), the summaries (fixed)
        far = [x[b:b + 1, :, pad[b]:] if plan.far == "strided" else x[b:b + 1] for x in far]
        return _chunks(q_g, k_g, v_g, (virtual_k, virtual_v), far, rule, plan, kind)

    # Read by every span: the virtual keys, and the far columns, so that each span's gradient of
    # them adds into one tensor.
    shared = [k[:, :, :P], v[:, :, :P]]
    if plan.far == "strided":
        shared += [k[:, :, P:], v[:, :, P:]]
    elif plan.far == "fixed":
        shared += [_summaries(x[:, :, P:], C, plan.visible.summary, pad) for x in (k, v)]
    return InGroups.apply(run, spans, q, k, v, *shared)


def _row_spans(plan: LocalPlan, n: int, b: int, pad: int, prefix_end: int) -> list[tuple]:
    """Row b as spans of queries, in order: its padding, the dense head, groups of whole chunks, the
    dense tail. A span is (b, q_lo, q_hi, k_lo, k_hi, kind), in q's and k's own slots; kind is the
    group's first chunk (counted in positions), None for dense, or "padding"."""
    C, R, P = plan.chunk, plan.reach, plan.n_virtual
    # The middle starts on a whole chunk of positions past the padding, where every tile's keys are
    # real tokens and every query is past the prefix.
    start = min(n, pad + -(-max(R - 1, prefix_end - pad) // C) * C)
    end = start + (n - start) // C * C
    # Padding queries see only themselves and the virtual keys, unless a prefix (which they see too)
    # puts them in the dense head.
    alone = pad if prefix_end <= pad else 0
    spans = [(b, 0, alone, P, P + alone, "padding")] if alone else []
    if start > alone:
        spans.append((b, alone, start, P + alone, P + start, None))
    group = max(1, GROUP_QUERIES // C)
    for c0 in range((start - pad) // C, (end - pad) // C, group):
        c1 = min(c0 + group, (end - pad) // C)
        spans.append((b, pad + c0 * C, pad + c1 * C, P + pad + c0 * C - (R - 1), P + pad + c1 * C, c0))
    if end < n:
        spans.append((b, end, n, P + alone, P + n, None))
    return spans


class InGroups(torch.autograd.Function):
    """out[b, q_lo:q_hi] = run(span, q[b, q_lo:q_hi], k[b, k_lo:k_hi], v[b, k_lo:k_hi], *shared) for
    each span (b, q_lo, q_hi, k_lo, k_hi, ...); backward recomputes one span at a time, so only one
    span's intermediate tensors (tiles, scores, their gradients) live at once. The spans' queries do
    not overlap; their keys may, and their gradients add up. `shared` tensors are read whole by
    every span."""

    @staticmethod
    def forward(ctx, run, spans, q, k, v, *shared):
        ctx.run, ctx.spans = run, spans
        ctx.save_for_backward(q, k, v, *shared)
        # Laid out [B, n, H, D], as SDPA's own output, so the caller's transpose back is a view
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        for s in spans:
            out[InGroups.where(s, 0)] = run(s, *InGroups.parts(s, q, k, v), *shared)
        return out

    @staticmethod
    def where(s, i: int) -> tuple:
        """The index of span s in input i: its queries in q (0), its keys in k and v (1, 2), all of a shared one."""
        if i >= 3:
            return (slice(None),)
        return slice(s[0], s[0] + 1), slice(None), slice(s[1], s[2]) if i == 0 else slice(s[3], s[4])

    @staticmethod
    def parts(s, q, k, v):
        return q[InGroups.where(s, 0)], k[InGroups.where(s, 1)], v[InGroups.where(s, 2)]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *shared = ctx.saved_tensors
        # (an empty tensor gets None: a gradient for it would cost its base a full-size zero tensor)
        grads = [torch.zeros_like(x) if need and x.numel() else None
                 for x, need in zip([q, k, v, *shared], ctx.needs_input_grad[2:], strict=True)]
        for s in ctx.spans:
            parts = [*InGroups.parts(s, q, k, v), *shared]
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(g is not None) for x, g in zip(parts, grads, strict=True)]
                out = ctx.run(s, *leaves)
                wanted = [x for x in leaves if x.requires_grad]
                # allow_unused: a span may not read every shared tensor (no virtual keys, say)
                got = iter(torch.autograd.grad(out, wanted, grad[InGroups.where(s, 0)], allow_unused=True)
                           if wanted else ())
            for i, total in enumerate(grads):
                part = next(got) if total is not None else None
                if part is not None:
                    total[InGroups.where(s, i)] += part
        return None, None, *grads


def _tiles(x: torch.Tensor, length: int, step: int) -> torch.Tensor:
    """x [B, H, m, D] as overlapping windows [B, H, (m - length) // step + 1, length, D], a view."""
    return x.unfold(2, length, step).transpose(-1, -2)


def _chunks(q, k, v, virtual, far, rule: Visibility, plan: LocalPlan, c0: int):
    """Chunks c0.. (counted in positions) of one row: q [1, H, n_chunks·C, D]; k, v the row's keys at
    positions c0·C - (R - 1) .. (c0 + n_chunks)·C - 1; far: () or the far columns' keys and values
    -> [1, H, n_chunks·C, D]."""
    _, H, n_q, D = q.shape
    C, R = plan.chunk, plan.reach
    n_chunks, dev = n_q // C, q.device
    tile_k, tile_v = (_tiles(x, C + R - 1, C) for x in (k, v))
    chunk_start = (c0 + torch.arange(n_chunks, device=dev)).view(1, n_chunks, 1, 1) * C
    q_slots = chunk_start + torch.arange(C, device=dev)[:, None]  # [1, n_chunks, C, 1]
    tile_start = q_slots[:, :, :1] - (R - 1)  # [1, n_chunks, 1, 1]
    k_slots = tile_start + torch.arange(C + R - 1, device=dev)  # [1, n_chunks, 1, C + R - 1]
    # Every chunk's tile holds the same positions relative to it (chunks start on whole blocks), so
    # one chunk's mask serves all.
    near = (rule(q_slots[:, :1], k_slots[:, :1]), tile_k, tile_v)
    q_chunks = q.view(1, H, n_chunks, C, D)
    n_blocks = c0 + n_chunks - 1  # the far columns end before the last chunk's tile starts
    if plan.far == "strided":
        blocks = [x[:, :, :n_blocks * C].unflatten(2, (n_blocks, C)) for x in far]
        j = torch.arange(n_blocks, device=dev).view(1, 1, 1, n_blocks)
        far_slots = j * C + q_slots % C  # [1, n_chunks(c), C(r), n_blocks(j)]: key (j, r) for query r
        out = _with_strided_columns(q_chunks, near, (rule(q_slots, far_slots) & (far_slots < tile_start), *blocks),
                                    virtual)
    else:
        shared = [(None, *virtual)]  # keys every chunk reads: the virtual ones, the fixed pattern's summaries
        if plan.far == "fixed":
            S = rule.summary
            far_slots = (torch.arange(n_blocks, device=dev)[:, None] * C + C - S + torch.arange(S, device=dev))
            far_slots = far_slots.view(1, 1, 1, n_blocks * S)
            allowed = rule(q_slots, far_slots) & (far_slots < tile_start)  # [1, n_chunks, C, n_blocks·S]
            shared.append((allowed, *(x[:, :, :n_blocks * S] for x in far)))
        out = _chunked_sdpa(q_chunks, near, shared)
    return out.reshape(1, H, n_q, D)


def _summaries(x: torch.Tensor, C: int, S: int, pad: list[int]) -> torch.Tensor:
    """The fixed pattern's summary keys of each row: the last S positions of every block, counted
    from the row's first real token (its padding skipped), [B, Hkv, n_blocks·S, D]. A row with more
    padding has fewer blocks: its index runs past the end there (clamped), and is never read."""
    B, Hkv, n, D = x.shape
    n_blocks = (n - min(pad)) // C
    slots = (torch.arange(n_blocks, device=x.device)[:, None] * C + C - S + torch.arange(S, device=x.device)).flatten()
    slots = (torch.tensor(pad, device=x.device)[:, None] + slots).clamp(max=n - 1)  # [B, n_blocks·S]
    return x.gather(2, slots.view(B, 1, -1, 1).expand(B, Hkv, n_blocks * S, D))


def _chunked_sdpa(q_chunks, near, shared):
    """Each chunk's tile plus the shared columns, in one SDPA call: the chunks folded into the batch.
    near: (allowed [1, 1|n_chunks, C, L], key and value tiles [1, Hkv, n_chunks, L, D]);
    shared: [(allowed [1, n_chunks, C, K] or None for always visible, keys, values [1, Hkv, K, D])]."""
    allowed, k_tiles, v_tiles = near
    _, H, n_chunks, C, D = q_chunks.shape
    Hkv = k_tiles.shape[1]

    def fold(x):  # [1, heads, n_chunks, length, D] -> [n_chunks, heads, length, D]: a view
        return x.squeeze(0).transpose(0, 1)  # (squeeze, not [0]: its gradient is a view too, not a copy)

    masks, keys, values = [allowed], [fold(k_tiles)], [fold(v_tiles)]
    for columns, k, v in shared:
        K = k.shape[2]
        if K:
            masks.insert(0, torch.ones(1, 1, C, K, dtype=torch.bool, device=k.device) if columns is None else columns)
            keys.insert(0, fold(k[:, :, None].expand(1, Hkv, n_chunks, K, D)))
            values.insert(0, fold(v[:, :, None].expand(1, Hkv, n_chunks, K, D)))

    def joined(parts, dim=-2):  # a lone tile stays a view of k or v: no copy of the keys
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    if len(masks) > 1:
        masks = [m.expand(1, n_chunks, C, m.shape[-1]) for m in masks]
    mask = joined(masks, -1).squeeze(0)[:, None]  # [1|n_chunks, 1, C, L]
    return sdpa(fold(q_chunks), joined(keys), joined(values), mask, False).transpose(0, 1).unsqueeze(0)


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
