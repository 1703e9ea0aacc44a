"""A static, preallocated key/value cache: one buffer per layer, written in place.

Static shapes keep decoding free of reallocation (and compilable). `key_valid` records which
slots hold real tokens, so left-padded batches mask their padding.
"""

from __future__ import annotations

import torch

from ..config import Config


class KVCache:
    def __init__(self, c: Config, batch: int, max_len: int, *, dtype=torch.float32, device=None):
        # One slot more than it holds, never written: the keys read back are then never the whole
        # buffer, a case a compiled decode step would otherwise compile a second graph for (lmzoo.infer.compiled).
        shape = (batch, c.kv_heads, max_len + 1, c.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.key_valid = torch.zeros(batch, max_len + 1, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far, shared by all layers
        self.n_virtual = 0  # P-tuning v2's virtual tokens in the first slots
        self.prefix_len: torch.Tensor | None = None  # per row, for GLM's block positions
        self.rope_length = None  # Qwen1: the prefill's length (per row), which fixes the NTK alpha
        self.all_valid = True  # no padding written yet: decoding needs no mask and no check per step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, D] at slots length..length+T; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def write_virtual(self, key_values: list) -> None:
        """Put P-tuning v2's per-layer virtual keys/values [B, Hkv, P, D] in the first slots."""
        P = key_values[0][0].shape[2]
        for layer, (k, v) in enumerate(key_values):
            self.k[layer][:, :, :P] = k
            self.v[layer][:, :, :P] = v
        self.key_valid[:, :P] = True
        self.length = self.n_virtual = P

    def advance(self, n: int) -> None:
        self.length += n
