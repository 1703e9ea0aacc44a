"""Llama and the families written as diffs of it: Mistral, Qwen2 and Mixtral (hub names)."""

from __future__ import annotations

from ..config import Config
from ..errors import LmzooError
from .hf import HFFormat, activation, read_rope, write_rope
from .names import NameTable


def read_llama_config(hf: dict, source: str = "config.json") -> dict:
    n_heads = hf["num_attention_heads"]
    return dict(
        family="llama", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation(hf, "hidden_act", source), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), **read_rope(hf, source),
    )


def write_llama_config(c: Config) -> dict:
    if c.qkv_bias != c.o_bias:
        raise LmzooError("llama's attention_bias covers q, k, v and o together")
    return dict(
        vocab_size=c.vocab_size, num_hidden_layers=c.n_layers, hidden_size=c.d_model,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
        intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        hidden_act=c.activation, tie_word_embeddings=c.tie_embeddings, attention_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias, **write_rope(c),
    )


def read_mistral_config(hf: dict, source: str = "config.json") -> dict:
    out = read_llama_config(hf, source)
    out.update(family="mistral", sliding_window=hf.get("sliding_window"), qkv_bias=False, o_bias=False,
               mlp_bias=False)
    return out


def write_mistral_config(c: Config) -> dict:
    out = write_llama_config(c)
    if c.qkv_bias or c.mlp_bias:
        raise LmzooError("mistral has no biases")
    del out["attention_bias"], out["mlp_bias"]
    out["sliding_window"] = c.sliding_window
    return out


QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


def read_qwen2_config(hf: dict, source: str = "config.json") -> dict:
    out = read_llama_config(hf, source)
    out.update(family="qwen2", qkv_bias=True, o_bias=False, mlp_bias=False)
    if hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        # As transformers: layers from max_window_layers on attend through the window.
        first = hf.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS)
        out.update(sliding_window=hf["sliding_window"], sliding_window_from=first)
        types = hf.get("layer_types")
        n = out["n_layers"]
        if types is not None and types != ["sliding_attention" if i >= first else "full_attention" for i in range(n)]:
            raise LmzooError(f"{source}: layer_types {types!r} do not follow max_window_layers={first}: lmzoo "
                             "windows every layer from one index on")
    return out


def write_qwen2_config(c: Config) -> dict:
    if not c.qkv_bias or c.o_bias or c.mlp_bias:
        raise LmzooError("qwen2 has q/k/v biases and no others")
    out = write_llama_config(c.replace(o_bias=True))
    del out["attention_bias"], out["mlp_bias"]
    out["use_sliding_window"] = c.sliding_window is not None
    if c.sliding_window is not None:
        out.update(sliding_window=c.sliding_window, max_window_layers=c.sliding_window_from)
    return out


def read_mixtral_config(hf: dict, source: str = "config.json") -> dict:
    out = read_mistral_config(hf, source)
    out.update(family="mixtral", n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"])
    return out


def write_mixtral_config(c: Config) -> dict:
    if not c.n_experts:
        raise LmzooError("mixtral needs n_experts")
    return {**write_mistral_config(c), "num_local_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token}


def read_dense_only(read):
    def reader(hf: dict, source: str = "config.json") -> dict:
        out = read(hf, source)
        if out.get("n_experts"):
            raise LmzooError(f"{source}: this format has no experts")
        return out
    return reader


LLAMA_NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blocks.{{i}}.attn.{p}.{w}"
       for p in "qkvo" for w in ("weight", "bias")},
}
LLAMA_MLP_NAMES = {f"model.layers.{{i}}.mlp.{p}_proj.{w}": f"blocks.{{i}}.mlp.{p}.{w}"
                   for p in ("gate", "up", "down") for w in ("weight", "bias")}
# Mixtral's hub names: w1 is the gate, w3 the up projection, w2 the down projection.
MIXTRAL_MOE_NAMES = {
    "model.layers.{i}.block_sparse_moe.gate.weight": "blocks.{i}.mlp.router.weight",
    **{f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight": f"blocks.{{i}}.mlp.experts.{{e}}.{p}.weight"
       for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))},
}
IGNORED = ["model.layers.{i}.self_attn.rotary_emb.inv_freq"]

DENSE = NameTable({**LLAMA_NAMES, **LLAMA_MLP_NAMES}, ignore=IGNORED)
FORMATS = [
    HFFormat("llama", "LlamaForCausalLM", DENSE, read_llama_config, write_llama_config, "llama"),
    HFFormat("mistral", "MistralForCausalLM", DENSE, read_mistral_config, write_mistral_config, "mistral"),
    HFFormat("qwen2", "Qwen2ForCausalLM", DENSE, read_qwen2_config, write_qwen2_config, "qwen2"),
    HFFormat("mixtral", "MixtralForCausalLM", NameTable({**LLAMA_NAMES, **MIXTRAL_MOE_NAMES}, ignore=IGNORED),
             read_mixtral_config, write_mixtral_config, "mixtral"),
]
