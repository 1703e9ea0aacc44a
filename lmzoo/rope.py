"""Rotary position embeddings: one function with options for every family's variant.

Options come from Config: the fraction of head dims that rotate (ChatGLM: half), which dims
pair up ('half' as in HF Llama, 'interleaved' as in the original RoFormer and ChatGLM), and
context-extension scaling of the frequencies ('linear', 'llama3', 'dynamic' NTK).
"""

from __future__ import annotations

import math

import torch

from .config import Config


def ntk_alpha(seq_len: int, max_seq_len: int) -> int:
    """Qwen1's dynamic NTK step: alpha = 2^ceil(log2(seq_len/max_seq_len) + 1) - 1, at least 1,
    so 1 within max_seq_len, then 3 up to twice it, 7 up to four times, ..."""
    return max(2 ** math.ceil(math.log2(seq_len / max_seq_len) + 1) - 1, 1)


def inverse_frequencies(c: Config, seq_len: int | torch.Tensor | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d) for the rotated dims, after the config's scaling. Shape [d/2].

    For 'ntk_alpha' seq_len may be a LongTensor [B] (each row's own length): then [B, d/2]."""
    d, base = c.rope_dims, c.rope_base
    if c.rope_scaling == "ntk_alpha" and torch.is_tensor(seq_len):
        return torch.stack([inverse_frequencies(c, int(n)) for n in seq_len.tolist()])
    beyond = seq_len is not None and seq_len > c.max_seq_len
    if c.rope_scaling == "dynamic" and beyond:
        # Dynamic NTK: grow the base with the sequence so the lowest frequency still fits.
        base = base * ((c.rope_factor * seq_len / c.max_seq_len) - (c.rope_factor - 1)) ** (d / (d - 2))
    elif c.rope_scaling == "ntk_alpha" and beyond:
        # Qwen1's variant: a power-of-two step of the length (see ntk_alpha).
        base = base * ntk_alpha(seq_len, c.max_seq_len) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


def rope_tables(c: Config, positions: torch.Tensor, seq_len: int | None = None) -> list[tuple]:
    """[(cos, sin)] of position * frequency, each [B, 1, T, d/2] to broadcast over heads.

    positions is [B, T], or [2, B, T] for 2-D rotary (GLM): one table per position stream."""
    inv = inverse_frequencies(c, seq_len).to(positions.device)
    if inv.dim() == 2:  # one set of frequencies per row
        inv = inv[:, None, None, :]
    streams = positions if positions.dim() == 3 else positions[None]
    return [((p[:, None, :, None].float() * inv).cos(), (p[:, None, :, None].float() * inv).sin())
            for p in streams]


def apply_rope(x: torch.Tensor, tables: list[tuple], pairing: str) -> torch.Tensor:
    """Rotate x [B, H, T, D] by each table in turn; with two tables (GLM's 2-D rotary), the
    first half of the head dims turns with the position, the second with the block position."""
    if len(tables) == 1:
        return rotate(x, *tables[0], pairing)
    chunks = x.chunk(len(tables), dim=-1)
    return torch.cat([rotate(part, cos, sin, pairing) for part, (cos, sin) in zip(chunks, tables)], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x [B, H, T, D]; the rest pass through."""
    rd = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    xr = x[..., :rd]
    if pairing == "half":
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return rotated if rd == x.shape[-1] else torch.cat((rotated, x[..., rd:]), dim=-1)
