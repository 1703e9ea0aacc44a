"""Rotary position embeddings: one function with options for every family's variant.

Options come from Config: the fraction of head dims that rotate (ChatGLM: half), which dims
pair up ('half' as in HF Llama, 'interleaved' as in the original RoFormer and ChatGLM), and
context-extension scaling of the frequencies ('linear', 'llama3', 'dynamic' NTK).
"""

from __future__ import annotations

import math

import torch

from ..config import Config


def ntk_alpha(seq_len: int | torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Qwen1's dynamic NTK step: alpha = 2^ceil(log2(seq_len/max_seq_len) + 1) - 1, at least 1,
    so 1 within max_seq_len, then 3 up to twice it, 7 up to four times, ... One per row for a
    LongTensor of lengths; tensor ops throughout, which a compiled decode step traces."""
    n = torch.as_tensor(seq_len, dtype=torch.float64)
    return (2 ** torch.ceil(torch.log2(n / max_seq_len) + 1) - 1).clamp(min=1)


def inverse_frequencies(c: Config, seq_len: int | torch.Tensor | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d) for the rotated dims, after the config's scaling. Shape [d/2].

    For 'ntk_alpha' seq_len may be a LongTensor [B] (each row's own length): then [B, d/2]."""
    d, base = c.rope_dims, c.rope_base
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    if c.rope_scaling == "ntk_alpha" and seq_len is not None:
        # Qwen1's variant: the base grows by a power-of-two step of the length (see ntk_alpha)
        bases = (base * ntk_alpha(seq_len, c.max_seq_len) ** (d / (d - 2))).float()
        inv = 1.0 / (bases[..., None] ** exponents)
    else:
        if c.rope_scaling == "dynamic" and seq_len is not None and seq_len > c.max_seq_len:
            # Dynamic NTK: grow the base with the sequence so the lowest frequency still fits.
            base = base * ((c.rope_factor * seq_len / c.max_seq_len) - (c.rope_factor - 1)) ** (d / (d - 2))
        inv = 1.0 / (base ** exponents)
    if c.rope_fp16_frequencies:
        inv = inv.half().float()
    if c.rope_scaling == "linear":
        inv = inv / c.rope_factor
    elif c.rope_scaling == "llama3":
        inv = _llama3_scaling(inv, c)
    return inv


def _llama3_scaling(inv: torch.Tensor, c: Config) -> torch.Tensor:
    """Llama 3.1: slow (long-wavelength) frequencies are divided by the factor, fast ones kept,
    and the band between them is interpolated smoothly."""
    low_wavelen = c.rope_original_max_seq_len / c.rope_low_freq_factor
    high_wavelen = c.rope_original_max_seq_len / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = (c.rope_original_max_seq_len / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(c: Config, positions: torch.Tensor, seq_len: int | None = None,
                dtype: torch.dtype = torch.float32) -> list[tuple]:
    """[(C, S)] tables, each [B, T, 1, rotated dims], to broadcast over the heads of x [B, T, H, D].

    They are laid out so that one rotation is x * C + swap_pairs(x) * S (see rotate): C holds
    cos(position * theta_i) at both dims of pair i, S holds -sin at the pair's first dim and
    +sin at its second. Built once per forward pass (in fp32, then cast to `dtype`, as HF does)
    and shared by every layer. positions is [B, T], or [2, B, T] for 2-D rotary (GLM): one
    table per position stream."""
    inv = inverse_frequencies(c, seq_len).to(positions.device)
    if inv.dim() == 2:  # one set of frequencies per row
        inv = inv[:, None, None, :]
    streams = positions if positions.dim() == 3 else positions[None]
    tables = []
    for p in streams:
        angle = p[:, :, None, None].float() * inv  # [B, T, 1, rd/2]
        cos, sin = angle.cos(), angle.sin()
        if c.rope_pairing == "half":  # pairs (i, i + rd/2)
            C, S = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        else:  # interleaved pairs (2i, 2i + 1)
            C, S = torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)
        tables.append((C.to(dtype), S.to(dtype)))
    return tables


def apply_rope(x: torch.Tensor, tables: list[tuple], pairing: str) -> torch.Tensor:
    """Rotate x [B, T, H, D] by each table in turn; with two tables (GLM's 2-D rotary), the
    first half of the head dims turns with the position, the second with the block position."""
    if len(tables) == 1:
        return rotate(x, *tables[0], pairing)
    chunks = x.chunk(len(tables), dim=-1)
    return torch.cat([rotate(part, C, S, pairing) for part, (C, S) in zip(chunks, tables, strict=True)], dim=-1)


def rotate(x: torch.Tensor, C: torch.Tensor, S: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate the first C.shape[-1] dims of x [B, T, H, D]; the rest pass through.

    Each pair (a, b) becomes (a cos - b sin, b cos + a sin) = (a, b) * cos + (b, a) * (-sin, sin):
    with the pair partners swapped, a rotation is two products and a sum, the same numbers as
    the written-out form, in a handful of tensor ops instead of a dozen."""
    rd = C.shape[-1]
    xr = x if rd == x.shape[-1] else x[..., :rd]
    if pairing == "half":
        first, second = xr.chunk(2, dim=-1)
        swapped = torch.cat((second, first), dim=-1)
    else:
        swapped = xr.unflatten(-1, (rd // 2, 2)).flip(-1).flatten(-2)
    rotated = xr * C + swapped * S
    return rotated if rd == x.shape[-1] else torch.cat((rotated, x[..., rd:]), dim=-1)
