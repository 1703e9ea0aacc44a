"""Cheap activations are recomputed in backward instead of being held from forward.

A training forward pass keeps, for every layer, the inputs its backward pass will need. Some
of them are one cheap op away from a tensor that is kept anyway: a norm's output from the
norm's input (which the norm keeps for its own gradient), the MLP's act(gate) * up from gate
and up (which the activation keeps). Holding both is a [tokens, d] tensor per layer for
nothing; `recomputed(h, make)` holds only the recipe, and backward runs `make()` when it
needs h. The numbers are the same: `make` repeats the forward op on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

ENABLED = True  # False: keep every saved tensor, as plain autograd does (tests compare the two)


class _Target:
    """One recomputed tensor, shared by every op that saved it (q, k and v all read a norm's
    output): backward rebuilds it once and keeps it until the last of them has read it."""

    __slots__ = ("make", "unread", "value")

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make, self.unread, self.value = make, 0, None

    def read(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():  # backward needs the value only, not a graph through it
                self.value = self.make().contiguous()
        value = self.value
        self.unread -= 1
        if self.unread <= 0:
            self.value = None
        return value


class _Recipe:
    """What autograd holds instead of a saved tensor: its target and the view of it that was saved."""

    __slots__ = ("target", "size", "stride", "offset")

    def __init__(self, target: _Target, view: torch.Tensor):
        self.target = target
        self.size, self.stride, self.offset = view.shape, view.stride(), view.storage_offset()
        target.unread += 1

    def rebuild(self) -> torch.Tensor:
        return self.target.read().as_strided(self.size, self.stride, self.offset)


def _owns_its_memory(t: torch.Tensor) -> bool:
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and whole


@contextmanager
def _recompute_hooks(target: torch.Tensor, make: Callable[[], torch.Tensor]):
    # Autograd keeps the pack hook with every tensor saved here, so the hook must not hold
    # `target` (that would keep it alive, the very thing this avoids). It knows the target by
    # its memory instead: while the caller holds `target`, a tensor on the same memory is the
    # target or a view of it (an op may save a reshaped view, and not the caller's object).
    memory, dtype = target.untyped_storage().data_ptr(), target.dtype
    del target
    shared = _Target(make)

    def pack(t):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == memory:
            return _Recipe(shared, t)
        return t

    def unpack(saved):
        return saved.rebuild() if isinstance(saved, _Recipe) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def recomputed(target: torch.Tensor, make: Callable[[], torch.Tensor]):
    """A context in which autograd saves `target` as the recipe `make` (a function returning
    the same values) rather than the tensor. Nothing happens outside training, or for a target
    that is not the whole of its own memory (a view of something larger, whose other views
    must not be mistaken for it)."""
    if ENABLED and torch.is_grad_enabled() and _owns_its_memory(target):
        return _recompute_hooks(target, make)
    return nullcontext()
