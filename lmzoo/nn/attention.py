"""Self-attention: q/k/v projection (fused or separate), rotary, the KV cache, and SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .cache import KVCache
from .linear import Linear
from .rope import apply_rope

# SDPA learned to broadcast key/value heads (GQA) in torch 2.5; before that, repeat them.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class Step:
    """What every layer needs to know about the current forward pass."""

    rope: list | None  # rotary [(C, S)] tables, each [B, T, 1, rd] (lmzoo.nn.rope); None for learned positions
    query_scale: torch.Tensor | None  # [B, 1, T, 1] multiplier of the queries (logn attention), or None
    # (sparse, windowed) -> how that kind of layer attends: (mask, is_causal) for SDPA, with mask
    # boolean [B|1, 1, Tq, Tk] or None; or a LocalPlan (lmzoo.nn.local_attention), called as plan(q, k, v)
    masks: dict
    cache: KVCache | None
    prefix_kv: list | None = None  # P-tuning v2 without a cache: per layer (k, v) [B, Hkv, P, D]


class Attention(nn.Module):
    def __init__(self, c: Config, layer: int = 0):
        super().__init__()
        # Which masks this layer takes: GPT-3's sparse pattern or not, a sliding window or not.
        self.sparse, self.windowed = c.is_sparse_layer(layer), c.is_window_layer(layer)
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.kv_heads, c.head_size
        self.rope_pairing = c.rope_pairing if c.positions.startswith("rope") else None
        q_out, kv_out = self.n_heads * self.hd, self.n_kv * self.hd
        self.split = (q_out, kv_out, kv_out)
        if c.fused_qkv:
            # Qwen1 and ChatGLM: one matrix whose output is all-Q | all-K | all-V.
            self.qkv = Linear(c.d_model, sum(self.split), bias=c.qkv_bias)
        else:
            self.q = Linear(c.d_model, q_out, bias=c.qkv_bias)
            self.k = Linear(c.d_model, kv_out, bias=c.qkv_bias)
            self.v = Linear(c.d_model, kv_out, bias=c.qkv_bias)
        self.o = Linear(q_out, c.d_model, bias=c.o_bias)

    def project(self, x: torch.Tensor, rope: list | None):
        """q [B, H, T, D], k and v [B, Hkv, T, D], with q and k rotated."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.hd
        if hasattr(self, "qkv"):
            qk, v = self.qkv(x).split((self.split[0] + self.split[1], self.split[2]), dim=-1)
            qk = qk.view(B, T, H + Hkv, D)
            if rope is not None:  # q's and k's heads turn together: one rotation, not two
                qk = apply_rope(qk, rope, self.rope_pairing)
            q, k = qk.split((H, Hkv), dim=2)
        else:
            q, k, v = self.q(x).view(B, T, H, D), self.k(x).view(B, T, Hkv, D), self.v(x)
            if rope is not None:
                q, k = apply_rope(q, rope, self.rope_pairing), apply_rope(k, rope, self.rope_pairing)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, step.rope if self.rope_pairing is not None else None)
        if step.query_scale is not None:
            q = q * step.query_scale.to(q.dtype)
        if step.cache is not None:
            k, v = step.cache.update(layer, k, v)
        elif step.prefix_kv is not None:  # virtual keys are stored unrotated, in front
            pk, pv = step.prefix_kv[layer]
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        how = step.masks[self.sparse, self.windowed]
        y = sdpa(q, k, v, *how) if isinstance(how, tuple) else how(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


# attention_by_products keeps B x H x T x Tk weights for backward: up to 32 MB a layer in bf16.
# Beyond that, flash attention's memory wins, and by 1024 keys its speed has caught up (43 ms each).
_MAX_WEIGHTS_BY_PRODUCTS = 2 ** 24


def sdpa(q, k, v, mask, is_causal):
    if q.shape[2] == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        return one_query_attention(q, k, v, mask)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.shape[:3].numel() * k.shape[2] <= _MAX_WEIGHTS_BY_PRODUCTS):
        return attention_by_products(q, k, v, mask, is_causal)
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def one_query_attention(q, k, v, mask):
    """SDPA for one query per row (a decode step), as a product, a softmax and a weighted sum, in fp32.

    Compiled, this is one small matrix product and one fused loop: ~18 us per layer in the bf16
    decode step on this 2-core CPU, where SDPA's kernel took ~62 us (its set-up per call dwarfs
    the work: one query reads ~100 KB of keys and values). In A/B runs the compiled bf16 step got
    ~15% faster (75-81 -> 86-95 tok/s); fp32 and int8 within noise. Eagerly these ops would be
    slower than SDPA, so only the compiled step takes this path (`sdpa` above). The product stays
    a product: as a sum of q * k, inductor recomputed q's rotary tables inside the loop over keys.
    q [B, H, 1, D]; k, v [B, Hkv, Tk, D]; mask boolean [B|1, 1, 1, Tk] (True: attend) or None.
    """
    weights = grouped_scores(q.float(), k.float(), mask, False).softmax(-1)  # [B, Hkv, H / Hkv, 1, Tk]
    out = (weights[..., None] * v[:, :, None, None].float()).sum(-2)  # [B, Hkv, H / Hkv, 1, D]
    return out.reshape(q.shape).to(v.dtype)


def attention_by_products(q, k, v, mask, is_causal):
    """SDPA as two bf16 matrix products and a softmax, for training in bf16 on a CPU.

    SDPA's CPU flash kernel runs bf16 no faster than fp32: forward + backward took ~16-23 ms per
    layer of a [4, 256] LoRA step here, against ~13 ms for these products (33 vs 21 ms at [2, 512];
    even at [1, 1024]); the whole bf16 LoRA step ran ~6% faster. The numbers are those
    of transformers' eager bf16 attention (scores rounded to bf16, the softmax computed in fp32
    inside its kernel). The cost is memory: backward keeps the [B, H, T, Tk] bf16 attention
    weights (4.7 MB a layer at [4, 256]), where flash keeps a log-sum-exp per query.
    q [B, H, T, D]; k, v [B, Hkv, Tk, D]; mask boolean [B|1, 1, T, Tk] (True: attend) or None.
    """
    B, H, T, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    weights = grouped_scores(q, k, mask, is_causal).softmax(-1)
    return (weights.view(B, Hkv, H // Hkv * T, Tk) @ v).view(q.shape)


def grouped_scores(q, k, mask, is_causal):
    """The scaled, masked scores q k^T / sqrt(D) [B, Hkv, H / Hkv, T, Tk] of the two functions
    above, as one matrix product per key/value head: query head h reads key/value head h // (H / Hkv).
    Hidden keys get the dtype's lowest value, not -inf: a row whose keys are all hidden (padding)
    then stays finite, not NaN."""
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scores = (q.reshape(B, Hkv, H // Hkv * T, D) @ k.transpose(-1, -2)).view(B, Hkv, H // Hkv, T, Tk) * D ** -0.5
    if is_causal:  # top-left aligned, as SDPA's is_causal
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    return scores
