"""GGUF files (llama.cpp): metadata -> Config, tensor names -> lmzoo's, dequantized weights.

llama.cpp's converter permutes the rows of q and k so that rotary pairs are interleaved;
we undo that on load, so a GGUF model is the same model as its Hugging Face original.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import LmzooError
from .names import Mapped, NameTable

GGUF_LLAMA_NAMES = NameTable(
    {
        "token_embd.weight": "tok_emb.weight",
        "output_norm.weight": "final_norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
        "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
        "blk.{i}.attn_q.weight": Mapped("blocks.{i}.attn.q.weight", lambda t, c: unpermute(t, c.n_heads),
                                        lambda t, c: permute(t, c.n_heads)),
        "blk.{i}.attn_k.weight": Mapped("blocks.{i}.attn.k.weight", lambda t, c: unpermute(t, c.kv_heads),
                                        lambda t, c: permute(t, c.kv_heads)),
        "blk.{i}.attn_v.weight": "blocks.{i}.attn.v.weight",
        "blk.{i}.attn_output.weight": "blocks.{i}.attn.o.weight",
        "blk.{i}.ffn_gate.weight": "blocks.{i}.mlp.gate.weight",
        "blk.{i}.ffn_up.weight": "blocks.{i}.mlp.up.weight",
        "blk.{i}.ffn_down.weight": "blocks.{i}.mlp.down.weight",
    }
)

SUPPORTED_ARCHITECTURES = ("llama",)


def config_from_gguf(meta: dict, tensor_names, source: str) -> Config:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LmzooError(f"{source}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_names:
        raise LmzooError(f"{source}: rope_freqs (per-frequency rotary factors, Llama 3.1 GGUFs) is not implemented")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LmzooError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else int(get("vocab_size"))
    fields = dict(
        family="llama", vocab_size=vocab, n_layers=int(get("block_count")), d_model=d_model,
        n_heads=n_heads, n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", d_model // n_heads)), d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_base=float(get("rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in tensor_names,
    )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise LmzooError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not implemented (only linear)")
        fields.update(rope_scaling="linear", rope_factor=float(get("rope.scaling.factor")))
    return Config(**fields)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k: per head, rows (pair, 2) -> (2, pair)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row permutation of q/k: per head, rows (2, pair) -> (pair, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
