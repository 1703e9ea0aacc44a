"""Hugging Face model directories: config.json + (sharded) safetensors, in and out.

Each supported model_type is an HFFormat: a name table plus the translation between its
config.json fields and lmzoo's Config. Loading recognises the family from config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..errors import LmzooError
from .names import NameTable

ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass
class HFFormat:
    model_type: str
    architecture: str
    names: NameTable
    read_config: Callable[[dict], dict]  # config.json -> Config fields
    write_config: Callable[[Config], dict]  # Config -> config.json fields
    family: str = ""


# ----------------------------------------------------------------------------- rotary fields
def read_rope(hf: dict, source: str) -> dict:
    """Both spellings: transformers 5's `rope_parameters`, and `rope_theta` + `rope_scaling`."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if fraction is not None:
        out["rope_fraction"] = float(fraction)
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "dynamic"):
        raise LmzooError(f"{source}: rope_type {kind!r} is not implemented; "
                         "lmzoo supports default, linear, llama3 and dynamic")
    out.update(rope_scaling=kind, rope_factor=float(params["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_seq_len=int(params["original_max_position_embeddings"]))
    return out


def write_rope(c: Config) -> dict:
    out: dict[str, Any] = {"rope_theta": c.rope_base}
    if c.rope_fraction != 1.0:
        out["partial_rotary_factor"] = c.rope_fraction
    if c.rope_scaling is not None:
        scaling: dict[str, Any] = {"rope_type": c.rope_scaling, "factor": c.rope_factor}
        if c.rope_scaling == "llama3":
            scaling.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                           original_max_position_embeddings=c.rope_original_max_seq_len)
        out["rope_scaling"] = scaling
    return out


# ----------------------------------------------------------------------------- llama family
def read_llama_config(hf: dict, source: str = "config.json") -> dict:
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATION_NAMES:
        raise LmzooError(f"{source}: hidden_act {act!r} is not implemented; supported: {sorted(ACTIVATION_NAMES)}")
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=ACTIVATION_NAMES[act], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), **read_rope(hf, source),
    )


def write_llama_config(c: Config) -> dict:
    return dict(
        vocab_size=c.vocab_size, num_hidden_layers=c.n_layers, hidden_size=c.d_model,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
        intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        hidden_act=c.activation, tie_word_embeddings=c.tie_embeddings, attention_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias, **write_rope(c),
    )


def read_mistral_config(hf: dict, source: str = "config.json") -> dict:
    out = read_llama_config(hf, source)
    out.update(sliding_window=hf.get("sliding_window"), qkv_bias=False, o_bias=False, mlp_bias=False)
    return out


def write_mistral_config(c: Config) -> dict:
    out = write_llama_config(c)
    del out["attention_bias"], out["mlp_bias"]
    out["sliding_window"] = c.sliding_window
    return out


def read_qwen2_config(hf: dict, source: str = "config.json") -> dict:
    if hf.get("use_sliding_window"):
        raise LmzooError(f"{source}: use_sliding_window=true (Qwen2's per-layer windows) is not implemented")
    out = read_llama_config(hf, source)
    out.update(qkv_bias=True, o_bias=False, mlp_bias=False)
    return out


def write_qwen2_config(c: Config) -> dict:
    out = write_llama_config(c)
    del out["attention_bias"], out["mlp_bias"]
    out["use_sliding_window"] = False
    return out


LLAMA_NAMES = NameTable(
    {
        "model.embed_tokens.weight": "tok_emb.weight",
        "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
        **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blocks.{{i}}.attn.{p}.{w}"
           for p in "qkvo" for w in ("weight", "bias")},
        **{f"model.layers.{{i}}.mlp.{p}_proj.{w}": f"blocks.{{i}}.mlp.{p}.{w}"
           for p in ("gate", "up", "down") for w in ("weight", "bias")},
    },
    ignore=["model.layers.{i}.self_attn.rotary_emb.inv_freq"],
)

FORMATS: dict[str, HFFormat] = {
    "llama": HFFormat("llama", "LlamaForCausalLM", LLAMA_NAMES, read_llama_config, write_llama_config, "llama"),
    "mistral": HFFormat("mistral", "MistralForCausalLM", LLAMA_NAMES, read_mistral_config, write_mistral_config,
                        "mistral"),
    "qwen2": HFFormat("qwen2", "Qwen2ForCausalLM", LLAMA_NAMES, read_qwen2_config, write_qwen2_config, "qwen2"),
}


def format_for(model_type: str, source: str) -> HFFormat:
    if model_type not in FORMATS:
        raise LmzooError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported model_types: {', '.join(FORMATS)}")
    return FORMATS[model_type]


def format_that_expresses(c: Config) -> HFFormat:
    """The format whose config.json can say everything this Config says (the family's own first)."""
    order = sorted(FORMATS.values(), key=lambda f: f.family != c.family)
    for fmt in order:
        try:
            back = Config(**{**_comparable(c), **fmt.read_config(fmt.write_config(c))})
        except (LmzooError, KeyError):
            continue
        if _comparable(back) == _comparable(c):
            return fmt
    raise LmzooError(f"no Hugging Face format can express this {c.family} config "
                     f"(supported model_types: {', '.join(FORMATS)})")


def _comparable(c: Config) -> dict:
    d = c.to_dict()
    for k in ("family", "init_std", "scaled_residual_init", "lm_type"):
        d.pop(k)
    return d


# ----------------------------------------------------------------------------- files
def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise LmzooError(f"{path}: not a Hugging Face model directory (no config.json in it)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LmzooError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def config_from_hf(hf: dict, source: str) -> tuple[Config, HFFormat]:
    model_type = hf.get("model_type")
    if model_type is None:
        raise LmzooError(f"{source}: config.json has no model_type field")
    fmt = format_for(model_type, source)
    try:
        fields = fmt.read_config(hf, source)
    except KeyError as e:
        raise LmzooError(f"{source}: config.json lacks the field {e.args[0]!r} needed for model_type {model_type!r}") from None
    return Config(family=fmt.family, **fields), fmt


def safetensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise LmzooError(f"{index} names the shard {os.path.basename(f)}, which is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise LmzooError(f"{path}: no model.safetensors or model.safetensors.index.json "
                     "(only safetensors checkpoints are supported)")


def read_safetensors(files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LmzooError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def to_ours(tensors: dict[str, torch.Tensor], names: NameTable):
    """Rename a checkpoint's tensors; returns (ours, unknown checkpoint names)."""
    ours, unknown = {}, []
    for name, t in tensors.items():
        if names.ignored(name):
            continue
        target = names.ours(name)
        if target is None:
            unknown.append(name)
        else:
            ours[target] = t
    return ours, unknown


def to_theirs(state: dict[str, torch.Tensor], names: NameTable) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        target = names.theirs(name)
        if target is None:
            raise LmzooError(f"tensor {name} has no name in this checkpoint format")
        out[target] = t
    return out


def hf_config_json(c: Config, fmt: HFFormat, dtype: torch.dtype, bos_id=None, eos_id=None) -> dict:
    return {
        "architectures": [fmt.architecture],
        "model_type": fmt.model_type,
        **fmt.write_config(c),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
