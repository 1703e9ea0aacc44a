"""Building modules that a checkpoint will fill, without their random initialisation."""

from __future__ import annotations

import contextlib

import torch

_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                 "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def no_random_init():
    """Inside, torch.nn.init's initialisers leave tensors as they are. For modules built on the
    meta device to receive a checkpoint's tensors: their init computes nothing there, yet its
    first call imports torch._dynamo (~0.9 s of every cold start, measured). The initialisers are
    replaced process-wide while inside: build models one thread at a time."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(torch.nn.init, name, _unchanged)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _unchanged(tensor, *args, **kwargs):
    return tensor
