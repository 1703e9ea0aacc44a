"""Presets, each written as the changes it makes to its parent, as the source document does.

CLASSIC is the document's classic decoder (Config's defaults). Reading down this file is
reading the document: "Llama: the classic decoder", "Mistral: Llama with GQA everywhere",
"Qwen2: q/k/v with bias", and so on.
"""

from __future__ import annotations

import difflib

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

PRESETS: dict[str, Config] = {
    "classic": CLASSIC,
    "llama1-7b": LLAMA1_7B,
    "llama2-7b": LLAMA2_7B,
    "llama2-70b": LLAMA2_70B,
    "llama3-8b": LLAMA3_8B,
    "llama3.1-8b": LLAMA3_1_8B,
    "llama3.2-1b": LLAMA3_2_1B,
    "smollm2-135m": SMOLLM2_135M,
    "mistral-7b": MISTRAL_7B,
    "qwen2-7b": QWEN2_7B,
}

# Which preset each one is written as a diff of: `lmzoo info` shows the chain.
PARENTS: dict[str, str] = {
    "llama1-7b": "classic", "llama2-7b": "llama1-7b", "llama2-70b": "llama2-7b", "llama3-8b": "llama2-7b",
    "llama3.1-8b": "llama3-8b", "llama3.2-1b": "llama3.1-8b", "smollm2-135m": "llama2-7b",
    "mistral-7b": "llama2-7b", "qwen2-7b": "llama2-7b",
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
