"""GPT-1 (openai-gpt) and GPT-2 hub formats.

Both store every projection as a Conv1D, whose weight is [in, out]: the name table transposes
it to nn.Linear's [out, in] both ways. c_attn's output is all-Q | all-K | all-V, which is
lmzoo's fused qkv layout as it is. `save_pretrained` writes the names under "transformer.";
the original hub checkpoints (a base model) write them bare: the table reads both and writes
the first.

GPT-3 has no Hugging Face format: its sparse attention layers cannot be said in either
config.json, so both writers refuse a non-dense attention_pattern.
"""

from __future__ import annotations

from ..config import Config
from ..errors import LmzooError
from .hf import HFFormat, activation
from .names import Mapped, NameTable, transpose

# openai-gpt's own ACT_FNS: its "gelu" is gelu_new, the tanh approximation (not exact GELU).
OPENAI_GPT_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
OPENAI_GPT_AFN = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}
GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# The fields both formats fix (their config.json has no word for anything else).
GPT_COMMON = dict(norm="layernorm", norm_bias=True, positions="learned", mlp="gelu", qkv_bias=True, o_bias=True,
                  mlp_bias=True, fused_qkv=True)

# GPT-2 options the decoder does not implement: field -> the only value lmzoo accepts.
GPT2_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                    "scale_attn_weights": True, "add_cross_attention": False}


def check_writable(c: Config, name: str) -> None:
    """What neither GPT config.json can say: sparse attention (GPT-3), a head width of its own."""
    if c.attention_pattern != "dense":
        raise LmzooError(f"{name} has no sparse attention: attention_pattern={c.attention_pattern!r} "
                         "(GPT-3) cannot be saved as a Hugging Face model")
    if c.head_size * c.n_heads != c.d_model:
        raise LmzooError(f"{name} needs head_dim * n_heads == d_model; got {c.head_size} * {c.n_heads} "
                         f"!= {c.d_model}")


def read_openai_gpt_config(hf: dict, source: str = "config.json") -> dict:
    afn = hf.get("afn", "gelu")
    if afn not in OPENAI_GPT_ACTIVATIONS:
        raise LmzooError(f"{source}: afn {afn!r} is not implemented; openai-gpt supports "
                         f"{sorted(OPENAI_GPT_ACTIVATIONS)}")
    d = hf.get("n_embd", 768)
    return dict(
        family="gpt", **GPT_COMMON, norm_position="post", final_norm=False,
        vocab_size=hf.get("vocab_size", 40478), n_layers=hf.get("n_layer", 12), d_model=d,
        n_heads=hf.get("n_head", 12), d_ff=4 * d, max_seq_len=hf.get("n_positions", 512),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=OPENAI_GPT_ACTIVATIONS[afn],
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02),
    )


def write_openai_gpt_config(c: Config) -> dict:
    check_writable(c, "openai-gpt")
    if c.d_ff != 4 * c.d_model:
        raise LmzooError(f"openai-gpt's MLP is 4 * d_model wide; d_ff={c.d_ff} cannot be saved")
    if c.activation not in OPENAI_GPT_AFN:
        raise LmzooError(f"openai-gpt's afn has no {c.activation!r}; it has {sorted(OPENAI_GPT_AFN)}")
    return dict(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers,
        n_head=c.n_heads, afn=OPENAI_GPT_AFN[c.activation], layer_norm_epsilon=c.norm_eps,
        initializer_range=c.init_std, tie_word_embeddings=c.tie_embeddings,
    )


def read_gpt2_config(hf: dict, source: str = "config.json") -> dict:
    for key, accepted in GPT2_UNSUPPORTED.items():
        if key in hf and bool(hf[key]) != accepted:
            raise LmzooError(f"{source}: {key}={hf[key]!r} is not implemented by lmzoo "
                             f"(it supports {key}={str(accepted).lower()} only)")
    d = hf.get("n_embd", 768)
    return dict(
        family="gpt2", **GPT_COMMON, norm_position="pre", final_norm=True, scaled_residual_init=True,
        vocab_size=hf.get("vocab_size", 50257), n_layers=hf.get("n_layer", 12), d_model=d,
        n_heads=hf.get("n_head", 12), d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation(hf, "activation_function", source, "gelu_new"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02),
    )


def write_gpt2_config(c: Config) -> dict:
    check_writable(c, "gpt2")
    if c.activation not in GPT2_ACTIVATION:
        raise LmzooError(f"gpt2's activation_function has no {c.activation!r}")
    return dict(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers,
        n_head=c.n_heads, n_inner=None if c.d_ff == 4 * c.d_model else c.d_ff,
        activation_function=GPT2_ACTIVATION[c.activation], layer_norm_epsilon=c.norm_eps,
        initializer_range=c.init_std, tie_word_embeddings=c.tie_embeddings,
        **{key: accepted for key, accepted in GPT2_UNSUPPORTED.items()},
    )


def conv1d(ours: str) -> Mapped:
    """A Conv1D weight: stored [in, out], ours [out, in]."""
    return Mapped(ours, transpose, transpose)


def block_names(attn_norm: str, mlp_norm: str) -> dict:
    """One block's names (without the model prefix); both GPTs name their blocks alike."""
    out: dict = {}
    for w in ("weight", "bias"):
        out[f"h.{{i}}.ln_1.{w}"] = f"blocks.{{i}}.{attn_norm}.{w}"
        out[f"h.{{i}}.ln_2.{w}"] = f"blocks.{{i}}.{mlp_norm}.{w}"
    for theirs, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"),
                         ("mlp.c_proj", "mlp.down")):
        out[f"h.{{i}}.{theirs}.weight"] = conv1d(f"blocks.{{i}}.{ours}.weight")
        out[f"h.{{i}}.{theirs}.bias"] = f"blocks.{{i}}.{ours}.bias"
    return out


def with_and_without_prefix(names: dict, ignore: list[str]) -> NameTable:
    """"transformer."-prefixed names first (what save_pretrained writes, so what we write),
    then the bare names of base-model checkpoints; the head is never prefixed."""
    table = {**{"transformer." + k: v for k, v in names.items()}, **names, "lm_head.weight": "lm_head.weight"}
    return NameTable(table, ignore=[p for name in ignore for p in ("transformer." + name, name)])


# GPT-1 is post-norm: ln_1 normalises x + attn(x), ln_2 normalises x + mlp(x); it has no final norm.
OPENAI_GPT_NAMES = with_and_without_prefix(
    {"tokens_embed.weight": "tok_emb.weight", "positions_embed.weight": "pos_emb.weight",
     **block_names("attn_norm", "mlp_norm")},
    ignore=["position_ids", "h.{i}.attn.bias"])
# GPT-2 is pre-norm: ln_1 before attention, ln_2 before the MLP, ln_f after the last block.
# attn.bias / attn.masked_bias are causal-mask buffers that older versions saved.
GPT2_NAMES = with_and_without_prefix(
    {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.weight",
     "ln_f.bias": "final_norm.bias", **block_names("attn_norm", "mlp_norm")},
    ignore=["h.{i}.attn.bias", "h.{i}.attn.masked_bias"])

FORMATS = [
    HFFormat("openai-gpt", "OpenAIGPTLMHeadModel", OPENAI_GPT_NAMES, read_openai_gpt_config,
             write_openai_gpt_config, "gpt"),
    HFFormat("gpt2", "GPT2LMHeadModel", GPT2_NAMES, read_gpt2_config, write_gpt2_config, "gpt2"),
]
