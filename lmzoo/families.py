"""Presets, each written as the changes it makes to its parent, as the source document does.

CLASSIC is the document's classic decoder (Config's defaults). Reading down this file is
reading the document: "Llama: the classic decoder", "Mistral: Llama with GQA everywhere",
"Qwen2: q/k/v with bias", and so on.
"""

from __future__ import annotations

import difflib
import math

from .config import Config
from .errors import LmzooError

CLASSIC = Config(family="classic")

# Llama: the classic decoder (pre-norm RMSNorm, rotary, SwiGLU, no biases).
LLAMA1_7B = CLASSIC.replace(family="llama", vocab_size=32000, n_layers=32, d_model=4096, n_heads=32,
                            d_ff=11008, max_seq_len=2048, norm_eps=1e-6)
LLAMA2_7B = LLAMA1_7B.replace(max_seq_len=4096, norm_eps=1e-5)
LLAMA2_70B = LLAMA2_7B.replace(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672)
# Llama 3: GQA at every size, a 128K vocabulary, a larger rotary base.
LLAMA3_8B = LLAMA2_7B.replace(vocab_size=128256, n_kv_heads=8, d_ff=14336, max_seq_len=8192, rope_base=500000.0)
# Llama 3.1: the same weights' frequencies stretched to 128K context by llama3 rope scaling.
LLAMA3_1_8B = LLAMA3_8B.replace(max_seq_len=131072, rope_scaling="llama3", rope_factor=8.0,
                                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                rope_original_max_seq_len=8192)
LLAMA3_2_1B = LLAMA3_1_8B.replace(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192,
                                  tie_embeddings=True, rope_factor=32.0)
# SmolLM2: a small Llama with GQA and tied embeddings (the embedded default model).
SMOLLM2_135M = LLAMA2_7B.replace(family="llama", vocab_size=49152, n_layers=30, d_model=576, n_heads=9,
                                 n_kv_heads=3, d_ff=1536, max_seq_len=8192, rope_base=100000.0,
                                 tie_embeddings=True)

# Mistral: Llama with GQA everywhere and a sliding attention window.
MISTRAL_7B = LLAMA2_7B.replace(family="mistral", n_kv_heads=8, d_ff=14336, max_seq_len=32768,
                               sliding_window=4096)

# Qwen2: q, k and v have a bias (o and the MLP do not).
QWEN2_7B = LLAMA2_7B.replace(family="qwen2", qkv_bias=True, vocab_size=152064, n_layers=28, d_model=3584,
                             n_heads=28, n_kv_heads=4, d_ff=18944, max_seq_len=131072,
                             rope_base=1000000.0, norm_eps=1e-6)

# Mixtral: Mistral whose MLP is a sparse mixture of 8 SwiGLU experts, 2 per token.
MIXTRAL_8X7B = MISTRAL_7B.replace(family="mixtral", n_experts=8, experts_per_token=2, sliding_window=None,
                                  rope_base=1000000.0)

# GPT-1: post-norm LayerNorm, learned absolute positions, a 4x GELU MLP, biases everywhere,
# no final norm, tied head; q|k|v come from one matrix (c_attn).
GPT1 = CLASSIC.replace(family="gpt", norm="layernorm", norm_bias=True, norm_position="post", final_norm=False,
                       positions="learned", mlp="gelu", activation="gelu_tanh", qkv_bias=True, o_bias=True,
                       mlp_bias=True, fused_qkv=True, tie_embeddings=True, vocab_size=40478, n_layers=12,
                       d_model=768, n_heads=12, d_ff=3072, max_seq_len=512)
# GPT-2: pre-norm, one more LayerNorm after the last block, scaled residual init, 1024 positions.
GPT2 = GPT1.replace(family="gpt2", norm_position="pre", final_norm=True, scaled_residual_init=True,
                    vocab_size=50257, max_seq_len=1024)
GPT2_MEDIUM = GPT2.replace(n_layers=24, d_model=1024, n_heads=16, d_ff=4096)
GPT2_LARGE = GPT2.replace(n_layers=36, d_model=1280, n_heads=20, d_ff=5120)
GPT2_XL = GPT2.replace(n_layers=48, d_model=1600, n_heads=25, d_ff=6400)
# GPT-3: GPT-2 with dense and locally banded sparse attention alternating by layer, 2048 context.
# The paper does not give the band width; 256 is a choice, as is which layers are sparse.
GPT3_SMALL = GPT2.replace(family="gpt3", attention_pattern="banded", sparse_block=256, sparse_layers="odd",
                          max_seq_len=2048)


def _gpt3(n_layers: int, d_model: int, n_heads: int, head_dim: int) -> Config:
    return GPT3_SMALL.replace(n_layers=n_layers, d_model=d_model, n_heads=n_heads, head_dim=head_dim,
                              d_ff=4 * d_model)


# The sizes of Table 2.1 of the GPT-3 paper (n_layers, d_model, n_heads, d_head). XL's 24 heads of
# 128 do not multiply to its d_model of 2048 (a known typo); 16 heads of 128 keep the count.
GPT3_MEDIUM = _gpt3(24, 1024, 16, 64)
GPT3_LARGE = _gpt3(24, 1536, 16, 96)
GPT3_XL = _gpt3(24, 2048, 16, 128)
GPT3_2_7B = _gpt3(32, 2560, 32, 80)
GPT3_6_7B = _gpt3(32, 4096, 32, 128)
GPT3_13B = _gpt3(40, 5140, 40, 128)
GPT3_175B = _gpt3(96, 12288, 96, 128)

# Qwen1: one fused q|k|v matrix with bias; inference past the training length with dynamic
# NTK (power-of-two alpha) and logn attention scaling.
QWEN_7B = LLAMA2_7B.replace(family="qwen", fused_qkv=True, qkv_bias=True, vocab_size=151936, d_ff=11008,
                            max_seq_len=8192, norm_eps=1e-6, rope_scaling="ntk_alpha", logn_attention=True,
                            max_context=32768)

# ChatGLM2/3: fused q|k|v with bias, multi-query attention with 2 groups, rotary on half of
# each head's dims with interleaved pairs, and gate|up fused in one matrix.
CHATGLM2_6B = LLAMA2_7B.replace(family="chatglm", fused_qkv=True, qkv_bias=True, fused_gate_up=True,
                                n_kv_heads=2, rope_fraction=0.5, rope_pairing="interleaved", vocab_size=65024,
                                n_layers=28, d_ff=13696, max_seq_len=32768)
CHATGLM3_6B = CHATGLM2_6B.replace(max_seq_len=8192)
# GLM-4: ChatGLM's architecture, bigger vocabulary and context (rope_ratio 500 scales the base).
GLM4_9B = CHATGLM2_6B.replace(vocab_size=151552, n_layers=40, max_seq_len=131072, rope_base=5000000.0,
                              norm_eps=1.5625e-07)
# GLM-4-0414 (transformers' glm4): one more norm after each sublayer (sandwich norm); its
# checkpoints store q, k and v apart.
GLM4_9B_0414 = GLM4_9B.replace(post_sublayer_norm=True, fused_qkv=False, max_seq_len=32768, rope_base=10000.0,
                               norm_eps=1e-5)

# ChatGLM-6B (GLM v1): a prefix LM. DeepNorm (the normed input is the residual, scaled by
# sqrt(2 * 28) in every released size), 2-D rotary positions, a GELU MLP and biases everywhere.
# Its prompt ends "[gMASK] <sop>": <sop> opens the generated span, outside the prefix.
CHATGLM_6B = CLASSIC.replace(family="glm", norm="layernorm", norm_bias=True, norm_position="deepnorm",
                             residual_scale=math.sqrt(2 * 28), positions="rope_2d", rope_fraction=0.5,
                             fused_qkv=True, qkv_bias=True, o_bias=True, mlp="gelu", activation="gelu_tanh",
                             mlp_bias=True, lm_type="prefix", span_start_token=True, rope_fp16_frequencies=True,
                             tie_embeddings=True, vocab_size=130528, n_layers=28, d_model=4096,
                             n_heads=32, d_ff=16384, max_seq_len=2048)

PRESETS: dict[str, Config] = {
    "classic": CLASSIC,
    "gpt1": GPT1,
    "gpt2": GPT2,
    "gpt2-medium": GPT2_MEDIUM,
    "gpt2-large": GPT2_LARGE,
    "gpt2-xl": GPT2_XL,
    "gpt3-125m": GPT3_SMALL,
    "gpt3-350m": GPT3_MEDIUM,
    "gpt3-760m": GPT3_LARGE,
    "gpt3-1.3b": GPT3_XL,
    "gpt3-2.7b": GPT3_2_7B,
    "gpt3-6.7b": GPT3_6_7B,
    "gpt3-13b": GPT3_13B,
    "gpt3-175b": GPT3_175B,
    "llama1-7b": LLAMA1_7B,
    "llama2-7b": LLAMA2_7B,
    "llama2-70b": LLAMA2_70B,
    "llama3-8b": LLAMA3_8B,
    "llama3.1-8b": LLAMA3_1_8B,
    "llama3.2-1b": LLAMA3_2_1B,
    "smollm2-135m": SMOLLM2_135M,
    "mistral-7b": MISTRAL_7B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen-7b": QWEN_7B,
    "qwen2-7b": QWEN2_7B,
    "chatglm-6b": CHATGLM_6B,
    "chatglm2-6b": CHATGLM2_6B,
    "chatglm3-6b": CHATGLM3_6B,
    "glm4-9b": GLM4_9B,
    "glm4-9b-0414": GLM4_9B_0414,
}

# Which preset each one is written as a diff of: `lmzoo info` shows the chain.
PARENTS: dict[str, str] = {
    "gpt1": "classic", "gpt2": "gpt1", "gpt2-medium": "gpt2", "gpt2-large": "gpt2", "gpt2-xl": "gpt2",
    **{name: "gpt2" for name in ("gpt3-125m",)},
    **{name: "gpt3-125m" for name in ("gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b",
                                       "gpt3-13b", "gpt3-175b")},
    "llama1-7b": "classic", "llama2-7b": "llama1-7b", "llama2-70b": "llama2-7b", "llama3-8b": "llama2-7b",
    "llama3.1-8b": "llama3-8b", "llama3.2-1b": "llama3.1-8b", "smollm2-135m": "llama2-7b",
    "mistral-7b": "llama2-7b", "mixtral-8x7b": "mistral-7b", "qwen-7b": "llama2-7b", "qwen2-7b": "llama2-7b",
    "chatglm-6b": "classic", "chatglm2-6b": "llama2-7b", "chatglm3-6b": "chatglm2-6b", "glm4-9b": "chatglm2-6b",
    "glm4-9b-0414": "glm4-9b",
}


def preset(name: str) -> Config:
    """The preset called `name`; an unknown name gets the closest names as suggestions."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise LmzooError(f"unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)}")


def differences(config: Config, base: Config = CLASSIC) -> dict[str, tuple]:
    """Fields whose value differs from `base`: name -> (base value, config value)."""
    out = {}
    for name, value in config.to_dict().items():
        if name != "family" and getattr(base, name) != value:
            out[name] = (getattr(base, name), value)
    return out
