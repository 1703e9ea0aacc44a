"""Qwen1 (model_type 'qwen', remote code `QWenLMHeadModel`) hub format.

Qwen1 is the classic decoder with one fused q|k|v matrix (`attn.c_attn`, always with a bias;
output rows all-Q | all-K | all-V, as lmzoo's `qkv`), an MLP written `c_proj(w1(x) * silu(w2(x)))`
(so w2 is the gate and w1 the up projection, each `intermediate_size // 2` wide: config.json's
intermediate_size is twice lmzoo's d_ff), and two inference-only options past the training
length `seq_length`: dynamic NTK (`use_dynamic_ntk`, lmzoo's rope_scaling='ntk_alpha') and logn
attention (`use_logn_attn`). `no_bias` removes the biases of attn.c_proj and of the MLP.

The remote code's constraints, enforced here: multi-head attention only, and
kv_channels == hidden_size // num_attention_heads (its attention splits q|k|v by hidden_size).
Missing optional fields take the defaults of Qwen's own QWenConfig (use_dynamic_ntk and
use_logn_attn default to true there).
"""

from __future__ import annotations

from ..config import Config
from ..errors import LmzooError
from .hf import HFFormat
from .names import NameTable

# Qwen's remote code, which a saved directory names in auto_map (its .py files are not written).
AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}


def read_qwen_config(hf: dict, source: str = "config.json") -> dict:
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d % n_heads:
        raise LmzooError(f"{source}: hidden_size={d} is not a multiple of num_attention_heads={n_heads}")
    kv_channels = hf.get("kv_channels", d // n_heads)
    if kv_channels != d // n_heads:
        raise LmzooError(f"{source}: kv_channels={kv_channels} must equal hidden_size // num_attention_heads "
                         f"= {d // n_heads} (Qwen's attention splits q|k|v by hidden_size)")
    intermediate = hf["intermediate_size"]
    if intermediate % 2:
        raise LmzooError(f"{source}: intermediate_size={intermediate} must be even (w1 and w2 are each half of it)")
    seq_length = hf["seq_length"]
    context = hf.get("max_position_embeddings", 8192)
    bias = not hf.get("no_bias", True)
    return dict(
        family="qwen", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=d,
        n_heads=n_heads, d_ff=intermediate // 2, max_seq_len=seq_length,
        max_context=context if context > seq_length else None,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), rope_base=float(hf.get("rotary_emb_base", 10000)),
        rope_fraction=float(hf.get("rotary_pct", 1.0)),
        rope_scaling="ntk_alpha" if hf.get("use_dynamic_ntk", True) else None,
        logn_attention=bool(hf.get("use_logn_attn", True)),
        fused_qkv=True, qkv_bias=True, o_bias=bias, mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )


def write_qwen_config(c: Config) -> dict:
    if c.kv_heads != c.n_heads:
        raise LmzooError(f"qwen has multi-head attention only; n_kv_heads={c.kv_heads} != n_heads={c.n_heads}")
    if c.head_size * c.n_heads != c.d_model:
        raise LmzooError(f"qwen needs head_dim * n_heads == d_model; got {c.head_size} * {c.n_heads} != {c.d_model}")
    if not c.qkv_bias or c.o_bias != c.mlp_bias:
        raise LmzooError("qwen's c_attn always has a bias, and no_bias covers c_proj and the MLP together")
    if c.rope_scaling not in (None, "ntk_alpha"):
        raise LmzooError(f"qwen's only rotary scaling is dynamic NTK (ntk_alpha); got {c.rope_scaling!r}")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, kv_channels=c.head_size, intermediate_size=2 * c.d_ff,
        seq_length=c.max_seq_len, max_position_embeddings=c.context_limit, layer_norm_epsilon=c.norm_eps,
        rotary_emb_base=c.rope_base, rotary_pct=c.rope_fraction, use_dynamic_ntk=c.rope_scaling == "ntk_alpha",
        use_logn_attn=c.logn_attention, no_bias=not c.o_bias, tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std, scale_attn_weights=True, emb_dropout_prob=0.0, attn_dropout_prob=0.0,
        use_cache=True, use_flash_attn="auto",
    )


def qwen_extra_files(c: Config) -> dict:
    return {"auto_map": dict(AUTO_MAP)}


QWEN_NAMES = NameTable(
    {
        "transformer.wte.weight": "tok_emb.weight",
        "transformer.ln_f.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
        "transformer.h.{i}.ln_1.weight": "blocks.{i}.attn_norm.weight",
        "transformer.h.{i}.ln_2.weight": "blocks.{i}.mlp_norm.weight",
        **{f"transformer.h.{{i}}.{theirs}.{w}": f"blocks.{{i}}.{ours}.{w}"
           for theirs, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.o"),
                                # c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection
                                ("mlp.w1", "mlp.up"), ("mlp.w2", "mlp.gate"), ("mlp.c_proj", "mlp.down"))
           for w in ("weight", "bias")},
    },
    # Buffers some versions of the remote code saved: rotary tables and GPT-2-style causal masks.
    ignore=["transformer.rotary_emb.inv_freq", "transformer.h.{i}.attn.rotary_emb.inv_freq",
            "transformer.h.{i}.attn.masked_bias", "transformer.h.{i}.attn.bias"],
)

FORMATS = [
    HFFormat("qwen", "QWenLMHeadModel", QWEN_NAMES, read_qwen_config, write_qwen_config, "qwen",
             extra_files=qwen_extra_files),
]
