"""A static, preallocated key/value cache: one buffer per layer, written in place.

Static shapes keep decoding free of reallocation (and compilable). `key_valid` records which
slots hold real tokens, so left-padded batches mask their padding.

A layer that sees only the last w positions (a sliding window, or GPT-3's banded pattern) keeps
a rolling buffer of w slots instead, as Mistral's reference code did: text slot s lives at ring
position s % w, so generating far past the window keeps that layer's cache at a constant size.
Its dense (or strided, fixed) neighbours keep every slot. `ring_slots` says which text slot each
ring position holds, so the masks (lmzoo.nn.masks.Visibility) read ring keys by their real slot.
"""

from __future__ import annotations

import torch

from ..config import Config
from .masks import reach_of


def ring_size(c: Config, layer: int) -> int | None:
    """How many past positions `layer` can ever see (its rolling buffer), or None for all of them."""
    reach, far = reach_of(c, c.is_sparse_layer(layer), c.is_window_layer(layer))
    return reach if far is None else None


class KVCache:
    def __init__(self, c: Config, batch: int, max_len: int, *, dtype=torch.float32, device=None, virtual: int = 0,
                 rolling: bool = True):
        """max_len slots in all, of which the first `virtual` are P-tuning v2's virtual tokens;
        rolling=False: no ring buffers, every layer's keys in slot order."""
        # Full layers get one slot more than they hold, never written: the keys read back are then never
        # the whole buffer, a case a compiled decode step would otherwise compile a second graph for
        # (lmzoo.infer.compiled). A ring only where it is smaller than the whole text.
        self.ring = [r if r is not None and r < max_len - virtual else None
                     for r in (ring_size(c, i) if rolling else None for i in range(c.n_layers))]
        shapes = [(batch, c.kv_heads, max_len + 1 if r is None else virtual + r, c.head_size) for r in self.ring]
        self.k = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.v = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.ring_slots = {r: torch.full((r,), -1, dtype=torch.long, device=device) for r in set(self.ring) if r}
        self.key_valid = torch.zeros(batch, max_len + 1, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far, shared by all layers
        self.n_virtual = 0  # P-tuning v2's virtual tokens in the first slots
        self.prefix_len: torch.Tensor | None = None  # per row, for GLM's block positions
        self.rope_length = None  # Qwen1: the prefill's length (per row), which fixes the NTK alpha
        self.all_valid = True  # no padding written yet: decoding needs no mask and no check per step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, D] at slots length..length+T; return the keys and values to attend
        to: all so far, or for a ring layer (see ring_keys) the virtual ones, the ring and the new ones."""
        R = self.ring[layer]
        if R is None:
            end = self.length + k.shape[2]
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        P, start, T = self.n_virtual, self.length - self.n_virtual, k.shape[2]
        if start == 0 or T > 1:  # read before writing: the new keys would overwrite ones the first queries see
            keys = [torch.cat([b[:, :, :P if start == 0 else P + R], x], 2) for b, x in ((self.k[layer], k),
                                                                                        (self.v[layer], v))]
        kept = min(T, R)  # only the last R new slots can ever be seen again
        at = P + torch.arange(start + T - kept, start + T, device=k.device) % R
        self.k[layer][:, :, at] = k[:, :, T - kept:]
        self.v[layer][:, :, at] = v[:, :, T - kept:]
        if start == 0 or T > 1:
            return keys[0], keys[1]
        return self.k[layer], self.v[layer]  # one new query: it overwrote the one key that left its window

    def ring_keys(self, R: int, T: int) -> torch.Tensor | None:
        """The text slots of the keys a ring layer of size R attends to in this step (-1: empty),
        in the order update returns them, or None when they are simply 0..T-1 (a prefill)."""
        start = self.length - self.n_virtual
        if start == 0:
            return None
        slots = self.ring_slots[R]
        new = torch.arange(start, start + T, device=slots.device)
        if T > 1:
            return torch.cat([slots, new])
        return slots.index_put((new % R,), new)

    def write_virtual(self, key_values: list) -> None:
        """Put P-tuning v2's per-layer virtual keys/values [B, Hkv, P, D] in the first slots."""
        P = key_values[0][0].shape[2]
        for layer, (k, v) in enumerate(key_values):
            self.k[layer][:, :, :P] = k
            self.v[layer][:, :, :P] = v
        self.key_valid[:, :P] = True
        self.length = self.n_virtual = P

    def advance(self, n: int) -> None:
        start = self.length - self.n_virtual
        for R, slots in self.ring_slots.items():
            kept = torch.arange(start + n - min(n, R), start + n, device=slots.device)
            slots[kept % R] = kept
        self.length += n

    # ------------------------------------------------------------------ as plain tensors
    # A compiled decode step built ahead of time (lmzoo.infer.compiled) takes tensors, not this
    # object: `state` splits a cache into what is fixed for a compiled graph (the layout: a Python
    # tuple) and its tensors; `from_state` puts the two back together inside the graph.

    def state(self) -> tuple[tuple, list[torch.Tensor]]:
        """(layout, tensors). The last tensor's length is the number of filled slots (a new uninitialised
        byte per slot: not a view of another input, which a graph's inputs must not be)."""
        rings = sorted(self.ring_slots)
        layout = (tuple(self.ring), self.n_virtual, self.all_valid, self.prefix_len is not None,
                  self.rope_length is not None)
        tensors = [*self.k, *self.v, self.key_valid, *(self.ring_slots[r] for r in rings)]
        if self.prefix_len is not None:
            tensors.append(self.prefix_len)
        if self.rope_length is not None:  # a prompt length (int) when no row was padded
            tensors.append(torch.as_tensor(self.rope_length, device=self.key_valid.device).expand(len(self.key_valid)))
        return layout, [*tensors, torch.empty(self.length, dtype=torch.uint8, device=self.key_valid.device)]

    @classmethod
    def from_state(cls, layout: tuple, tensors: list[torch.Tensor]) -> KVCache:
        ring, n_virtual, all_valid, has_prefix_len, has_rope_length = layout
        cache = cls.__new__(cls)
        n, rest = len(ring), iter(tensors[2 * len(ring):])
        cache.ring, cache.k, cache.v = list(ring), list(tensors[:n]), list(tensors[n:2 * n])
        cache.key_valid = next(rest)
        cache.ring_slots = {r: next(rest) for r in sorted({r for r in ring if r})}
        cache.prefix_len = next(rest) if has_prefix_len else None
        cache.rope_length = next(rest) if has_rope_length else None
        cache.length = next(rest).shape[0]
        cache.max_len = cache.key_valid.shape[1] - 1
        cache.n_virtual, cache.all_valid = n_virtual, all_valid
        return cache

    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
