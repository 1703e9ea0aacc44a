"""ChatGLM-6B (GLM v1, a prefix LM) in its chatglm (remote code) format.

THUDM's modeling_chatglm.py (hub repo THUDM/chatglm-6b) is the reference for what the
format means:
- query_key_value's output is laid out per head, [n_heads, (q, k, v), head_dim]; lmzoo's fused
  qkv is all-Q | all-K | all-V, so the rows are regrouped on the way in and back on the way out.
- Each block is DeepNorm: h = LN(x); x' = alpha*h + attn(h); m = LN2(x'); out = alpha*m + mlp(m).
  GLMBlock takes alpha = sqrt(2 * num_layers) from its own `num_layers=28` default, which
  ChatGLMModel never overrides: every checkpoint of this format runs with alpha = sqrt(56),
  whatever its config.json's num_layers says.
- 2-D rotary: the first half of each head turns with the position, the second half with the
  block position, each with rotate_half pairing over head_dim/2 dims (base 10000).
- The MLP is dense_h_to_4h -> tanh-approximated GELU -> dense_4h_to_h, all Linear with bias.
- ChatGLMConfig does not set tie_word_embeddings, so transformers' default (True) ties
  lm_head to word_embeddings.

Attention scores are divided by sqrt(head_dim) * (layer_id + 1) and multiplied back by
(layer_id + 1) before the softmax (query_key_layer_scaling): plain scaled attention.

This module reads and writes config.json and the weights. How a prompt is laid out
("... [gMASK] <sop>") and which position ids go with it is the caller's concern: THUDM's
context (the bidirectional prefix) is every token before <sop>, so pass
prefix_len = index of <sop>.
"""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..errors import LmzooError
from .hf import HFFormat
from .names import Mapped, NameTable

# GLMBlock's default num_layers, which sets DeepNorm's alpha for every ChatGLM-6B checkpoint.
THUDM_ALPHA_LAYERS = 28
ALPHA = math.sqrt(2 * THUDM_ALPHA_LAYERS)
ROPE_BASE = 10000.0  # hard-coded in THUDM's SelfAttention


def is_glm1(hf: dict) -> bool:
    """GLM v1 configs have 2-D positions and inner_hidden_size; ChatGLM2/3 and GLM-4 have neither."""
    return "position_encoding_2d" in hf or "inner_hidden_size" in hf


def refuse_thudm_options(hf: dict, source: str) -> None:
    """Options of THUDM's remote code (every ChatGLM generation) that lmzoo does not run."""
    if hf.get("quantization_bit") not in (None, 0):
        raise LmzooError(f"{source}: quantization_bit={hf['quantization_bit']!r} (THUDM's int4/int8 weights) "
                         "is not supported; load the float16/bfloat16 checkpoint (quantization_bit=0)")
    if hf.get("pre_seq_len") is not None:
        raise LmzooError(f"{source}: pre_seq_len={hf['pre_seq_len']!r} (a P-tuning v2 prefix encoder) "
                         "is not supported; merge or drop the prefix encoder (pre_seq_len=null)")


def read_glm1_config(hf: dict, source: str = "config.json") -> dict:
    if hf.get("position_encoding_2d", True) is not True:
        raise LmzooError(f"{source}: position_encoding_2d={hf['position_encoding_2d']!r} (GLM's 1-D rotary) "
                         "is not implemented; lmzoo runs ChatGLM-6B's 2-D positions (position_encoding_2d=true)")
    refuse_thudm_options(hf, source)
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d % n_heads or (d // n_heads) % 4:
        raise LmzooError(f"{source}: hidden_size={d} / num_attention_heads={n_heads} must be a whole head "
                         "width divisible by 4 (2-D rotary turns two halves of each head in pairs)")
    return dict(
        # always multi-head with head_dim = hidden_size / heads: left None, as the preset says it
        family="glm", vocab_size=hf["vocab_size"], n_layers=hf["num_layers"], d_model=d, n_heads=n_heads,
        n_kv_heads=None, head_dim=None, d_ff=hf["inner_hidden_size"] or 4 * d,
        max_seq_len=hf.get("max_sequence_length", 2048), norm="layernorm", norm_bias=True,
        norm_eps=hf.get("layernorm_epsilon", 1e-5), norm_position="deepnorm", residual_scale=ALPHA,
        positions="rope_2d", rope_base=ROPE_BASE, rope_fraction=0.5, rope_pairing="half",
        fused_qkv=True, qkv_bias=True, o_bias=True, mlp="gelu", activation="gelu_tanh", mlp_bias=True,
        lm_type="prefix", span_start_token=True, rope_fp16_frequencies=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def write_glm1_config(c: Config) -> dict:
    if not math.isclose(c.residual_scale, ALPHA, rel_tol=0, abs_tol=1e-12):
        raise LmzooError(f"chatglm (GLM v1) runs DeepNorm with alpha = sqrt(2*{THUDM_ALPHA_LAYERS}) whatever "
                         f"the depth; Config.residual_scale={c.residual_scale} cannot be written")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_layers=c.n_layers,
        num_attention_heads=c.n_heads, inner_hidden_size=c.d_ff, layernorm_epsilon=c.norm_eps,
        max_sequence_length=c.max_seq_len, position_encoding_2d=True, quantization_bit=0,
        pre_seq_len=None, prefix_projection=False, use_cache=True, tie_word_embeddings=c.tie_embeddings,
    )


def glm1_remote_code(c: Config) -> dict:
    """THUDM's code lives on the hub; a written directory points there (trust_remote_code)."""
    return {"auto_map": {
        "AutoConfig": "THUDM/chatglm-6b--configuration_chatglm.ChatGLMConfig",
        "AutoModel": "THUDM/chatglm-6b--modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "THUDM/chatglm-6b--modeling_chatglm.ChatGLMForConditionalGeneration",
    }}


# ----------------------------------------------------------------------------- qkv layout
def _check_qkv(t: torch.Tensor, c: Config) -> tuple[int, int]:
    n, hd = c.n_heads, c.head_size
    if t.shape[0] != 3 * n * hd:
        raise LmzooError(f"attention.query_key_value has {t.shape[0]} output rows; the config needs "
                         f"3 * num_attention_heads * head_dim = {3 * n * hd}")
    return n, hd


def per_head_qkv_to_ours(t: torch.Tensor, c: Config) -> torch.Tensor:
    """Rows [head, (q|k|v), head_dim] -> [(q|k|v), head, head_dim] (all-Q | all-K | all-V)."""
    n, hd = _check_qkv(t, c)
    return t.reshape(n, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def per_head_qkv_to_theirs(t: torch.Tensor, c: Config) -> torch.Tensor:
    """The inverse: all-Q | all-K | all-V -> each head's q, k, v side by side."""
    n, hd = _check_qkv(t, c)
    return t.reshape(3, n, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


_W = ("weight", "bias")
GLM1_NAMES = {
    "transformer.word_embeddings.weight": "tok_emb.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"transformer.final_layernorm.{w}": f"final_norm.{w}" for w in _W},
    **{f"transformer.layers.{{i}}.input_layernorm.{w}": f"blocks.{{i}}.attn_norm.{w}" for w in _W},
    **{f"transformer.layers.{{i}}.attention.query_key_value.{w}":
       Mapped(f"blocks.{{i}}.attn.qkv.{w}", per_head_qkv_to_ours, per_head_qkv_to_theirs) for w in _W},
    **{f"transformer.layers.{{i}}.attention.dense.{w}": f"blocks.{{i}}.attn.o.{w}" for w in _W},
    **{f"transformer.layers.{{i}}.post_attention_layernorm.{w}": f"blocks.{{i}}.mlp_norm.{w}" for w in _W},
    **{f"transformer.layers.{{i}}.mlp.dense_h_to_4h.{w}": f"blocks.{{i}}.mlp.up.{w}" for w in _W},
    **{f"transformer.layers.{{i}}.mlp.dense_4h_to_h.{w}": f"blocks.{{i}}.mlp.down.{w}" for w in _W},
}
# THUDM's RotaryEmbedding registers inv_freq as a buffer (so it is saved) but never loads it.
IGNORED = ["transformer.layers.{i}.attention.rotary_emb.inv_freq"]

FORMATS = [
    HFFormat("chatglm", "ChatGLMModel", NameTable(GLM1_NAMES, ignore=IGNORED), read_glm1_config,
             write_glm1_config, "glm", matches=is_glm1, extra_files=glm1_remote_code),
]
