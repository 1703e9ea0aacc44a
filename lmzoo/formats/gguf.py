"""GGUF architectures (llama.cpp): metadata <-> Config, tensor names <-> lmzoo's.

A GGUF architecture is read and written through the Hugging Face format it was converted from,
as llama.cpp's own converter does: its metadata keys are renamed config.json fields, so the
family's rules (defaults, checks, what it can express) stay in hf_*.py, once. What GGUF says in
another way (a bias by the presence of its tensor, tied embeddings by the absence of
`output.weight`, the rotary dims as a count) is translated here, each arch by a small function.

llama.cpp's `llama` architecture applies rotary embeddings to interleaved pairs, so its converter
permutes the rows of q and k; we undo that on load, so a GGUF model is the same model as its
Hugging Face original.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..errors import LmzooError
from . import registry
from .hf import HFFormat
from .names import Mapped, NameTable


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k: per head, rows (pair, 2) -> (2, pair)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row permutation of q/k: per head, rows (2, pair) -> (pair, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotary_rows(ours: str, heads: Callable[[Config], int]) -> Mapped:
    return Mapped(ours, lambda t, c: unpermute(t, heads(c)), lambda t, c: permute(t, heads(c)))


_W = ("weight", "bias")
_COMMON_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
    "blk.{i}.attn_output.weight": "blocks.{i}.attn.o.weight",
    "blk.{i}.attn_output.bias": "blocks.{i}.attn.o.bias",
}
_SEPARATE_QKV = {f"blk.{{i}}.attn_{p}.{w}": f"blocks.{{i}}.attn.{p}.{w}" for p in "qkv" for w in _W}
_SWIGLU = {f"blk.{{i}}.ffn_{p}.{w}": f"blocks.{{i}}.mlp.{p}.{w}" for p in ("gate", "up", "down") for w in _W}
# Experts are stored stacked, one 3-D tensor per projection; they are split per expert on load
# (`blk.{i}.ffn_gate_exps.{e}.weight`, a name only this module uses) and stacked again on write.
_EXPERTS = {
    "blk.{i}.ffn_gate_inp.weight": "blocks.{i}.mlp.router.weight",
    **{f"blk.{{i}}.ffn_{p}_exps.{{e}}.weight": f"blocks.{{i}}.mlp.experts.{{e}}.{p}.weight"
       for p in ("gate", "up", "down")},
}
_STACKED = re.compile(r"(blk\.\d+\.ffn_(?:gate|up|down)_exps)\.weight\Z")
_ONE_EXPERT = re.compile(r"(blk\.\d+\.ffn_(?:gate|up|down)_exps)\.(\d+)\.weight\Z")

LLAMA_NAMES = NameTable({
    **_COMMON_NAMES, **_SEPARATE_QKV, **_SWIGLU, **_EXPERTS,
    "blk.{i}.attn_q.weight": _rotary_rows("blocks.{i}.attn.q.weight", lambda c: c.n_heads),
    "blk.{i}.attn_k.weight": _rotary_rows("blocks.{i}.attn.k.weight", lambda c: c.kv_heads),
    "blk.{i}.attn_q.bias": _rotary_rows("blocks.{i}.attn.q.bias", lambda c: c.n_heads),
    "blk.{i}.attn_k.bias": _rotary_rows("blocks.{i}.attn.k.bias", lambda c: c.kv_heads),
})
# Qwen2 rotates halves (NEOX order in llama.cpp), as transformers does: no permutation.
QWEN2_NAMES = NameTable({**_COMMON_NAMES, **_SEPARATE_QKV, **_SWIGLU})
GPT2_NAMES = NameTable({
    **_COMMON_NAMES,
    "position_embd.weight": "pos_emb.weight",
    "output_norm.bias": "final_norm.bias",
    **{f"blk.{{i}}.{theirs}.{w}": f"blocks.{{i}}.{ours}.{w}"
       for theirs, ours in (("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm"), ("attn_qkv", "attn.qkv"),
                            ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down"))
       for w in _W},
})

# Qwen1: one q|k|v matrix; w1 is the up projection and w2 the gate (hf_qwen.py), as llama.cpp maps them.
QWEN_NAMES = NameTable({
    **_COMMON_NAMES, **_SWIGLU,
    **{f"blk.{{i}}.attn_qkv.{w}": f"blocks.{{i}}.attn.qkv.{w}" for w in _W},
})
# ChatGLM: one q|k|v matrix from THUDM's checkpoints, three from transformers' glm (llama.cpp takes
# either, and lmzoo fuses them on load); ffn_up is gate | up; rotary pairs are interleaved on the
# first half of each head, which is llama.cpp's NORM rope on rope.dimension_count dims: no permutation.
_GLM_MLP = {f"blk.{{i}}.ffn_{theirs}.{w}": f"blocks.{{i}}.mlp.{ours}.{w}"
            for theirs, ours in (("up", "gate_up"), ("down", "down")) for w in _W}
CHATGLM_NAMES = NameTable({
    **_COMMON_NAMES, **_SEPARATE_QKV, **_GLM_MLP, "output_norm.bias": "final_norm.bias",
    **{f"blk.{{i}}.attn_qkv.{w}": f"blocks.{{i}}.attn.qkv.{w}" for w in _W},
    **{f"blk.{{i}}.{theirs}.bias": f"blocks.{{i}}.{ours}.bias"
       for theirs, ours in (("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm"))},
})
# GLM-4-0414: a norm after each sublayer too. llama.cpp's ffn_norm is the pre-MLP norm, whatever
# transformers calls it.
GLM4_NAMES = NameTable({
    **_COMMON_NAMES, **_SEPARATE_QKV, **_GLM_MLP,
    "blk.{i}.post_attention_norm.weight": "blocks.{i}.attn_post_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "blocks.{i}.mlp_post_norm.weight",
})
_QKV = re.compile(r"blk\.(\d+)\.attn_q\.(weight|bias)\Z")


def fuse_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate attn_q/k/v -> one attn_qkv (rows q | k | v), for an arch lmzoo reads as fused."""
    out = dict(tensors)
    for name in tensors:
        m = _QKV.match(name)
        if m:
            i, w = m.groups()
            parts = [out.pop(f"blk.{i}.attn_{p}.{w}", None) for p in "qkv"]
            if any(p is None for p in parts):
                raise LmzooError(f"blk.{i}.attn_q.{w} is there but not all of attn_k.{w}, attn_v.{w}")
            out[f"blk.{i}.attn_qkv.{w}"] = torch.cat(parts)
    return out


@dataclass
class GGUFArch:
    """One llama.cpp architecture: which HF formats it carries, and how their fields are spelled."""

    name: str  # general.architecture
    formats: tuple[str, ...]  # the HF model_types it can hold, the one to read into first
    names: NameTable
    keys: Mapping[str, str]  # GGUF key (after "<arch>.") -> config.json field, copied as is
    required: tuple[str, ...]  # keys llama.cpp's loader requires for this arch
    # (metadata with the arch prefix removed, tensor names) -> further config.json fields, and back
    extra_to_hf: Callable[[dict, set], dict] = lambda meta, names: {}
    extra_from_hf: Callable[[dict, Config], dict] = lambda hf, c: {}
    pick_format: Callable[[dict], str] = lambda hf: ""  # "" means formats[0]
    # Config fields this arch's GGUF cannot carry, which llama.cpp's converter drops too: the value
    # written instead, and why that is the same model (or where it is not)
    dropped: dict[str, tuple] = field(default_factory=dict)
    vocab_field: str = "vocab_size"  # config.json's name for the vocabulary size
    # other HF formats this arch holds, by the same model in its own format's terms
    also: dict[str, Callable[[Config], Config]] = field(default_factory=dict)
    # the file's tensors -> the names `names` maps (fusing what lmzoo keeps fused)
    prepare: Callable[[dict], dict] = lambda tensors: tensors
    # what llama.cpp's graph for this arch cannot run although the HF format can say it: {field: ok?}
    limits: Callable[[Config], dict[str, bool]] = lambda c: {}
    # rotary: the generic keys (rope.dimension_count, rope.scaling.*: _rotary_to_hf / _rotary_from_hf),
    # the rope.scaling.type values the arch's reader translates, and Llama 3's rope_freqs tensor
    rotary_keys: bool = False
    scalings: tuple[str, ...] = ()
    rope_freqs: bool = False


def _rotary_to_hf(meta: dict, hf: dict) -> dict:
    out = {}
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    rotated = meta.get("rope.dimension_count", head_dim)
    if rotated != head_dim:
        out["partial_rotary_factor"] = rotated / head_dim
    if meta.get("rope.scaling.type") == "linear":  # the only type the arch's `scalings` let through
        out["rope_scaling"] = {"rope_type": "linear", "factor": _number(meta, "rope.scaling.factor")}
    return out


def _rotary_from_hf(hf: dict, c: Config) -> dict:
    out = {"rope.dimension_count": int(c.head_size * c.rope_fraction)}
    if c.rope_scaling == "linear":
        out.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(c.rope_factor)})
    elif c.rope_scaling == "llama3":
        # The factors go in the rope_freqs tensor (extra_tensors), as llama.cpp's converter writes them.
        # llama.cpp reads this key only for YaRN; lmzoo reads it back to recover the rule's fields.
        out["rope.scaling.original_context_length"] = c.rope_original_max_seq_len
    elif c.rope_scaling is not None:
        raise LmzooError(f"rope_scaling={c.rope_scaling!r} cannot be written to GGUF (llama.cpp has linear and "
                         "Llama 3's per-frequency factors)")
    return out


def extra_tensors(arch: GGUFArch, c: Config) -> dict[str, torch.Tensor]:
    """Tensors a GGUF file holds that are not weights: Llama 3's rotary factors."""
    return {"rope_freqs.weight": rope_factors(c)} if arch.rope_freqs and c.rope_scaling == "llama3" else {}


def _llama_to_hf(meta: dict, names: set) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names,
            "tie_word_embeddings": "output.weight" not in names}


_LLAMA_KEYS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}
_LLAMA_REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                   "attention.head_count", "attention.layer_norm_rms_epsilon")

ARCHES = [
    GGUFArch(
        "llama", ("llama", "mistral", "mixtral"), LLAMA_NAMES,
        {**_LLAMA_KEYS, "expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
        _LLAMA_REQUIRED, extra_to_hf=_llama_to_hf,
        pick_format=lambda hf: "mixtral" if hf.get("num_local_experts") else "llama",
        # its rotary applies to whole heads (llama.cpp checks rope.dimension_count == head width)
        limits=lambda c: {f"rope_fraction={c.rope_fraction}": c.rope_fraction == 1.0},
        rotary_keys=True, scalings=("linear",), rope_freqs=True,
        # As llama.cpp's converter: Mistral's window is not written (its llama graph attends densely,
        # which equals the window up to `sliding_window` tokens).
        dropped={"sliding_window": (None, "llama.cpp's llama architecture has no sliding window: it attends to "
                                          "every token, the same model up to the window's length")},
    ),
    GGUFArch("qwen2", ("qwen2",), QWEN2_NAMES, _LLAMA_KEYS, _LLAMA_REQUIRED,
             extra_to_hf=lambda meta, names: {"tie_word_embeddings": "output.weight" not in names},
             limits=lambda c: {f"rope_fraction={c.rope_fraction}": c.rope_fraction == 1.0,
                               f"head_dim={c.head_size} * n_heads != d_model": c.head_size * c.n_heads == c.d_model},
             dropped={"sliding_window": (None, "llama.cpp's qwen2 architecture has no sliding window: it attends "
                                               "to every token, the same model up to the window's length")},
             rotary_keys=True, scalings=("linear",)),
    GGUFArch(
        "gpt2", ("gpt2",), GPT2_NAMES,
        {"context_length": "n_positions", "embedding_length": "n_embd", "block_count": "n_layer",
         "feed_forward_length": "n_inner", "attention.head_count": "n_head",
         "attention.layer_norm_epsilon": "layer_norm_epsilon"},
        ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
         "attention.layer_norm_epsilon"),
        extra_to_hf=lambda meta, names: {"tie_word_embeddings": "output.weight" not in names},
        extra_from_hf=lambda hf, c: {"feed_forward_length": c.d_ff},  # config.json leaves n_inner out at 4 * d
    ),
]


def _qwen_to_hf(meta: dict, names: set) -> dict:
    # llama.cpp's qwen has neither dynamic NTK nor logn attention: both act only past seq_length,
    # which is the file's context_length.
    out = {"use_dynamic_ntk": False, "use_logn_attn": False, "no_bias": "blk.0.attn_output.bias" not in names,
           "seq_length": _number(meta, "context_length"), "tie_word_embeddings": False}
    if "rope.dimension_count" in meta:
        out["rotary_pct"] = meta["rope.dimension_count"] / (meta["embedding_length"] // meta["attention.head_count"])
    return out


def _chatglm_to_hf(meta: dict, names: set) -> dict:
    d, heads = _number(meta, "embedding_length"), _number(meta, "attention.head_count")
    rotated = meta.get("rope.dimension_count", d // heads // 2)
    # llama.cpp's linear scaling divides the positions: ChatGLM2-6B-32K's meaning of rope_ratio
    interpolated = meta.get("rope.scaling.type") == "linear"
    if interpolated and meta.get("rope.freq_base", 10000.0) != 10000.0:
        raise LmzooError(f"rope.scaling.type=linear with rope.freq_base={meta['rope.freq_base']}: lmzoo's "
                         "chatglm interpolates positions from base 10000 only (ChatGLM2-6B-32K)")
    ratio = _number(meta, "rope.scaling.factor") if interpolated else meta.get("rope.freq_base", 10000.0) / 10000.0
    return {"multi_query_attention": True, "kv_channels": 2 * rotated, "rope_ratio": ratio,
            **({"_name_or_path": "THUDM/chatglm2-6b-32k"} if interpolated else {}),
            "add_qkv_bias": "blk.0.attn_qkv.bias" in names or "blk.0.attn_q.bias" in names,
            "add_bias_linear": "blk.0.attn_output.bias" in names,
            "rmsnorm": "output_norm.bias" not in names, "post_layer_norm": "output_norm.weight" in names}


def _glm4_to_hf(meta: dict, names: set) -> dict:
    heads = _number(meta, "attention.head_count")
    head_dim = meta.get("attention.key_length", _number(meta, "embedding_length") // heads)
    # GlmConfig's defaults (head_dim 128, 2 kv heads) are not llama.cpp's (d/n, n): say them
    return {"head_dim": head_dim, "num_key_value_heads": meta.get("attention.head_count_kv", heads),
            "attention_bias": "blk.0.attn_q.bias" in names, "tie_word_embeddings": "output.weight" not in names,
            "partial_rotary_factor": meta.get("rope.dimension_count", head_dim // 2) / head_dim}


ARCHES += [
    GGUFArch(
        "qwen", ("qwen",), QWEN_NAMES,
        {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
         "context_length": "max_position_embeddings",
         # llama.cpp's loader halves it, as Qwen's config.json means: w1 and w2 are each half as wide
         "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
         "rope.freq_base": "rotary_emb_base",
         # llama.cpp's converter writes Qwen's epsilon as attention.layer_norm_epsilon, which the
         # loader never reads: it requires layer_norm_rms_epsilon (Qwen's norms are RMSNorm), so that.
         "attention.layer_norm_rms_epsilon": "layer_norm_epsilon"},
        ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
         "attention.layer_norm_rms_epsilon"),
        extra_to_hf=_qwen_to_hf,
        extra_from_hf=lambda hf, c: {"context_length": c.max_seq_len,
                                     "rope.dimension_count": int(c.head_size * c.rope_fraction)},
        dropped={"rope_scaling": (None, "llama.cpp's qwen has no dynamic NTK, which acts past max_seq_len only"),
                 "logn_attention": (False, "llama.cpp's qwen has no logn attention, which acts past max_seq_len only"),
                 "max_context": (None, "llama.cpp's qwen runs up to max_seq_len (context_length)")},
    ),
    GGUFArch(
        "chatglm", ("chatglm",), CHATGLM_NAMES,
        {"context_length": "seq_length", "embedding_length": "hidden_size", "feed_forward_length": "ffn_hidden_size",
         "block_count": "num_layers", "attention.head_count": "num_attention_heads",
         "attention.head_count_kv": "multi_query_group_num", "attention.layer_norm_rms_epsilon": "layernorm_epsilon"},
        ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
         "attention.layer_norm_rms_epsilon"),
        extra_to_hf=_chatglm_to_hf,
        extra_from_hf=lambda hf, c: {"rope.dimension_count": c.head_size // 2, "rope.freq_base": float(c.rope_base),
                                     **({"rope.scaling.type": "linear", "rope.scaling.factor": float(c.rope_factor)}
                                        if c.rope_scaling == "linear" else {})},
        vocab_field="padded_vocab_size",
        # transformers' glm is the same model with q, k, v apart, which llama.cpp's chatglm also reads
        also={"glm": lambda c: c.replace(fused_qkv=True, family="chatglm")},
        prepare=fuse_qkv, scalings=("linear",),  # ChatGLM2-6B-32K's position interpolation
        limits=lambda c: {f"norm={c.norm!r}": c.norm == "rmsnorm", f"norm_position={c.norm_position!r}":
                          c.norm_position == "pre", f"final_norm={c.final_norm}": c.final_norm,
                          f"o_bias={c.o_bias}, mlp_bias={c.mlp_bias}": not (c.o_bias or c.mlp_bias),
                          f"head_dim={c.head_size} * n_heads != d_model": c.head_size * c.n_heads == c.d_model},
    ),
    GGUFArch("glm4", ("glm4",), GLM4_NAMES, _LLAMA_KEYS, _LLAMA_REQUIRED, extra_to_hf=_glm4_to_hf,
             extra_from_hf=lambda hf, c: {"rope.dimension_count": int(c.head_size * c.rope_fraction)}),
]
ARCH_BY_NAME = {a.name: a for a in ARCHES}


def _check_scaling(arch: GGUFArch, meta: dict) -> None:
    """Rotary scaling the arch's reader does not translate is refused, not ignored."""
    kind = meta.get("rope.scaling.type", "none")
    if kind not in ("none", *arch.scalings):
        raise LmzooError(f"rope.scaling.type={kind!r} is not implemented for {arch.name}")


def _number(meta: dict, key: str):
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LmzooError(f"{key} is {value!r}, expected a number")
    return value


# ----------------------------------------------------------------------------- reading
def read_arch(meta: dict, tensor_names, source: str, rope_freqs: torch.Tensor | None = None
              ) -> tuple[GGUFArch, Config]:
    """The architecture of a GGUF file and the Config its metadata and tensor list describe
    (and the `rope_freqs.weight` tensor, where the file has one)."""
    name = meta.get("general.architecture")
    if not isinstance(name, str) or name not in ARCH_BY_NAME:
        raise LmzooError(f"{source}: GGUF architecture {name!r} is not supported; "
                         f"supported: {', '.join(ARCH_BY_NAME)}")
    arch = ARCH_BY_NAME[name]
    ours = {k[len(name) + 1:]: v for k, v in meta.items() if k.startswith(name + ".")}
    for key in arch.required:
        if key not in ours:
            raise LmzooError(f"{source}: GGUF metadata lacks {name}.{key}")
    names = set(tensor_names)
    if "rope_freqs.weight" in names and rope_freqs is None:
        raise LmzooError(f"{source}: the tensor rope_freqs.weight is needed to read the rotary scaling")
    if "attention.value_length" in ours and ours["attention.value_length"] != ours.get("attention.key_length"):
        raise LmzooError(f"{source}: {name}.attention.value_length={ours['attention.value_length']} differs from "
                         f"{name}.attention.key_length={ours.get('attention.key_length')}; "
                         "lmzoo's heads have one width")
    if "vocab_size" not in ours and "tokenizer.ggml.tokens" not in meta:
        raise LmzooError(f"{source}: GGUF metadata lacks {name}.vocab_size, and has no tokenizer.ggml.tokens to count")
    try:
        hf = {field_: _number(ours, key) for key, field_ in arch.keys.items() if key in ours}
        hf[arch.vocab_field] = (len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta
                            else _number(ours, "vocab_size"))
        hf.update(arch.extra_to_hf(ours, names))
        _check_scaling(arch, ours)
        if arch.rotary_keys:
            hf.update(_rotary_to_hf(ours, hf))
        if "rope_freqs.weight" in names:
            hf.update(_llama3_rope(rope_freqs, ours, hf))
    except LmzooError as e:
        raise LmzooError(f"{source}: {name}.{e}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # a key of the wrong type, a zero count
        raise LmzooError(f"{source}: GGUF metadata of this {name} model cannot be read "
                         f"({type(e).__name__}: {e})") from None
    model_type = arch.pick_format(hf) or arch.formats[0]
    fmt = next(f for f in registry.FORMATS[model_type] if f.matches(hf))
    try:
        fields = fmt.read_config(hf, source)
        return arch, Config(**fields)
    except LmzooError as e:
        raise LmzooError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise LmzooError(f"{source}: GGUF metadata cannot describe a {model_type} model ({type(e).__name__}: {e})"
                         ) from None


LLAMA3_ORIGINAL_CONTEXT = 8192  # Llama 3.1's, where a file does not say rope.scaling.original_context_length


def rope_factors(c: Config) -> torch.Tensor:
    """What llama.cpp's rope_freqs tensor holds: each rotary frequency's divisor under the scaling."""
    from ..nn.rope import inverse_frequencies

    return (inverse_frequencies(c.replace(rope_scaling=None)) / inverse_frequencies(c)).float()


def _llama3_rope(factors: torch.Tensor, meta: dict, hf: dict) -> dict:
    """Llama 3.1's rotary scaling from the per-frequency factors llama.cpp's converter stores.

    The rule: frequencies whose wavelength is short keep factor 1, long ones take `factor`, and in
    between the reciprocal interpolates, s = orig / (wavelength * (high - low)) - low / (high - low).
    So factor is the largest factor, and a line fitted through the band's s against 1/wavelength
    gives high - low and low for the file's original context. The fit is checked by recomputing
    every factor; a file with factors of another rule is refused, not approximated."""
    base = hf.get("rope_theta", 10000.0)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    f = factors.double().flatten()
    if f.numel() != head_dim // 2 or not torch.isfinite(f).all() or (f <= 0).any():
        raise LmzooError(f"rope_freqs.weight has {f.numel()} values, expected {head_dim // 2} positive ones")
    orig = int(meta.get("rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
    factor = f.max().item()
    if factor < 1 + 1e-6:
        return {}
    wavelength = 2 * math.pi * base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # 1 where f = 1 (short waves), 0 where f = factor
    x = 1 / wavelength
    band = (s > 1e-4) & (s < 1 - 1e-4)
    kept, scaled = x[s >= 1 - 1e-4], x[s <= 1e-4]
    x_kept = kept.min().item() if len(kept) else None  # the longest wave left alone
    x_scaled = scaled.max().item() if len(scaled) else None  # the shortest wave fully scaled
    if band.sum() >= 2:  # the line through the band (real models: head_dim 64 or 128)
        xb, yb = x[band], s[band]
        slope = (((xb - xb.mean()) * (yb - yb.mean())).sum() / ((xb - xb.mean()) ** 2).sum()).item()
        intercept = (yb.mean() - slope * xb.mean()).item()
    elif band.sum() == 1:  # any line through the point that keeps its neighbours on their sides
        x0, s0 = x[band].item(), s[band].item()
        slope = max((1 - s0) / (x_kept - x0) if x_kept else 0.0, s0 / (x0 - x_scaled) if x_scaled else 0.0)
        intercept = s0 - slope * x0
    elif x_kept and x_scaled:  # no band between two neighbours: a line from one to the other
        slope = 1 / (x_kept - x_scaled)
        intercept = -slope * x_scaled
    else:
        raise LmzooError("rope_freqs.weight does not follow Llama 3's rule")
    width = orig / slope  # s = slope / wavelength + intercept, slope = orig / (high - low)
    low = -intercept * width
    scaling = {"rope_type": "llama3", "factor": _round(factor), "low_freq_factor": _round(low),
               "high_freq_factor": _round(low + width), "original_max_position_embeddings": orig}
    fields = {"rope_scaling": "llama3", "rope_factor": scaling["factor"],
              "rope_low_freq_factor": scaling["low_freq_factor"],
              "rope_high_freq_factor": scaling["high_freq_factor"], "rope_original_max_seq_len": orig}
    try:
        rebuilt = rope_factors(Config(head_dim=head_dim, n_heads=1, d_model=head_dim, rope_base=base, **fields))
    except LmzooError as e:  # the fit is no valid rule at all
        raise LmzooError(f"rope_freqs.weight does not follow Llama 3's rule ({e})") from None
    if not torch.allclose(rebuilt.double(), f, rtol=1e-4, atol=0):
        raise LmzooError("rope_freqs.weight does not follow Llama 3's rule, the only per-frequency scaling lmzoo has")
    return {"rope_scaling": scaling}


def _round(x: float) -> float:
    return float(f"{x:.5g}")  # float32 factors, fitted: 4.0000002 is the 4 a config.json said


def config_from_gguf(meta: dict, tensor_names, source: str, rope_freqs: torch.Tensor | None = None) -> Config:
    return read_arch(meta, tensor_names, source, rope_freqs)[1]


def prepare_tensors(arch: GGUFArch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors under the names arch.names maps: experts split, q/k/v fused where lmzoo fuses."""
    tensors = {k: v for k, v in tensors.items() if k != "rope_freqs.weight"}  # read into the Config
    return arch.prepare(split_experts(tensors))


def split_experts(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors -> one per expert, under the names LLAMA_NAMES maps."""
    out = {}
    for name, t in tensors.items():
        m = _STACKED.match(name)
        if m:
            out.update({f"{m.group(1)}.{e}.weight": t[e] for e in range(len(t))})
        else:
            out[name] = t
    return out


def stacked_name(name: str) -> str:
    """One expert's tensor name -> the stacked tensor it came from (itself for any other name)."""
    m = _ONE_EXPERT.match(name)
    return f"{m.group(1)}.weight" if m else name


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, groups = {}, {}
    for name, t in tensors.items():
        m = _ONE_EXPERT.match(name)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for stem, experts in groups.items():
        out[f"{stem}.weight"] = torch.stack([experts[e] for e in range(len(experts))])
    return out


# ----------------------------------------------------------------------------- writing
def arch_for(c: Config) -> tuple[GGUFArch, HFFormat, Config, list[str]]:
    """The llama.cpp architecture that can hold this config, its HF format, the config in that
    format's terms, and what it drops (each with the reason); a config no architecture can hold
    is refused, naming the field."""
    if c.attention_pattern != "dense":
        raise LmzooError(f"llama.cpp has no sparse attention: Config.attention_pattern={c.attention_pattern!r} "
                         "(GPT-3) cannot be written to GGUF")
    if c.lm_type != "causal":
        raise LmzooError(f"llama.cpp runs causal LMs only: Config.lm_type={c.lm_type!r} cannot be written to GGUF")
    try:
        fmt = registry.format_that_expresses(c)
    except LmzooError as e:
        raise LmzooError(f"no GGUF architecture can hold this {c.family} config: {e}") from None
    arch = next((a for a in ARCHES if fmt.model_type in a.formats), None)
    if arch is None:
        holder = next((a for a in ARCHES if fmt.model_type in a.also), None)
        if holder is not None:
            c = holder.also[fmt.model_type](c)
            arch, fmt = holder, registry.format_that_expresses(c)
    if arch is None:
        known = ", ".join(f"{a.name} ({'/'.join(a.formats)})" for a in ARCHES)
        why = ("it is post-norm (Config.norm_position='post')" if c.norm_position == "post"
               else f"its Hugging Face format is {fmt.model_type!r}")
        raise LmzooError(f"llama.cpp has no architecture for this {c.family} model: {why}; "
                         f"GGUF architectures lmzoo writes: {known}")
    broken = [k for k, ok in arch.limits(c).items() if not ok]
    if broken:
        raise LmzooError(f"llama.cpp's {arch.name} architecture cannot run this model's {', '.join(broken)}")
    changed = {k: v for k, (v, _) in arch.dropped.items() if getattr(c, k) != v}
    notes = [f"{k}={getattr(c, k)!r} ({arch.dropped[k][1]})" for k in changed]
    c = c.replace(**changed)
    _check_round_trip(arch, c)
    return arch, registry.format_that_expresses(c), c, notes


def _check_round_trip(arch: GGUFArch, c: Config) -> None:
    """The metadata and tensor names written for `c` read back as `c`: whatever the arch cannot say
    is refused here, naming the fields, rather than written as another model."""
    from ..nn.init import no_random_init
    from ..nn.model import Decoder

    with torch.device("meta"), no_random_init():
        ours = [k for k in Decoder(c).state_dict() if not (c.tie_embeddings and k == "lm_head.weight")]
    extra = extra_tensors(arch, c)
    names = {stacked_name(arch.names.their_name(k)) for k in ours} | set(extra)
    meta = {"general.architecture": arch.name, **arch_metadata(arch, registry.format_that_expresses(c), c)}
    try:
        back = read_arch(meta, names, "", extra.get("rope_freqs.weight"))[1]
    except LmzooError as e:
        raise LmzooError(f"llama.cpp's {arch.name} architecture cannot hold this model: {e}") from None
    # Llama 3's rule is stored as its factors, which several (low, high, original) triples give
    rule = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")
    ours, theirs = registry.comparable(c), registry.comparable(back)
    lost = sorted(k for k, v in ours.items() if theirs.get(k) != v and not (k in rule and c.rope_scaling == "llama3"))
    if c.rope_scaling == "llama3" and not torch.allclose(rope_factors(back), rope_factors(c), rtol=1e-4, atol=0):
        lost += list(rule)
    if lost:
        raise LmzooError(f"llama.cpp's {arch.name} architecture cannot hold this model's "
                         + ", ".join(f"{k}={getattr(c, k)!r}" for k in lost))


def arch_metadata(arch: GGUFArch, fmt: HFFormat, c: Config) -> dict:
    """The `<arch>.*` keys for a config (values as Python ints/floats; the writer types them)."""
    hf = fmt.write_config(c)
    meta = {}
    for key, field_ in arch.keys.items():
        value = hf.get(field_)
        if value is not None:
            meta[key] = value
    if arch.rotary_keys:
        meta.update(_rotary_from_hf(hf, c))
    # Written only where heads are not d_model / n_heads wide, and then both, as llama.cpp reads them.
    if c.head_size * c.n_heads == c.d_model:
        meta.pop("attention.key_length", None)
    else:
        meta.update({"attention.key_length": c.head_size, "attention.value_length": c.head_size})
    if c.n_experts:
        meta.update({"expert_count": c.n_experts, "expert_used_count": c.experts_per_token})
    meta["vocab_size"] = c.vocab_size
    meta.update(arch.extra_from_hf(hf, c))
    return {f"{arch.name}.{k}": v for k, v in meta.items()}
