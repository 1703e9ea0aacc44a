"""ChatGLM2/3 and GLM-4 in the chatglm (remote code) format, and transformers' native glm and glm4.

chatglm (model_type 'chatglm', THUDM's modeling_chatglm.py of ChatGLM2-6B, ChatGLM3-6B and
GLM-4-9B-chat; GLM v1 shares the model_type and lives in hf_glm1.py) is the reference for what
the format means:
- Pre-norm blocks, RMSNorm (`rmsnorm=false`: LayerNorm with a bias), an optional final norm
  (`post_layer_norm`). `apply_residual_connection_post_layernorm=true` makes the residual the
  *normed* input, x' = norm(x) + f(norm(x)): lmzoo's norm_position='deepnorm' with alpha 1.
- query_key_value is one matrix. With `multi_query_attention` its output rows are all-Q | all-K |
  all-V (multi_query_group_num key/value heads), lmzoo's own layout. Without it (multi-head) the
  rows are per head, [head, (q, k, v), head_dim], and are regrouped on the way in; such a model
  is written back with multi_query_attention=true and as many groups as heads, which THUDM's code
  runs identically.
- Rotary on the first kv_channels // 2 dims of each head, pairs (2i, 2i+1) interleaved, base
  10000 * rope_ratio (ChatGLM3 and GLM-4 code; rope_ratio is absent, i.e. 1, for ChatGLM2-6B).
  ChatGLM2-6B-32K's own code reads rope_ratio as position interpolation instead (positions /
  rope_ratio, base 10000: lmzoo's rope_scaling='linear'); its config.json says so only by naming
  that repository (_name_or_path or auto_map), which lmzoo reads, and writes back with such a
  model. `original_rope` is stored by THUDM's RotaryEmbedding but never read.
- dense_h_to_4h is gate | up (first half through SiLU); dense_4h_to_h is down.
- `add_bias_linear` puts a bias on every Linear (o and the MLP too); `add_qkv_bias` on q|k|v only.
- The output layer (transformer.output_layer) is never tied to the embedding by THUDM's code,
  whatever tie_word_embeddings says.
Fields a config.json leaves out take ChatGLMConfig's defaults (kv_channels 128, rmsnorm true,
multi_query_attention false, ...). Attention is scaled by 1/sqrt(kv_channels);
query_key_layer_scaling divides and multiplies back by the layer number around an fp32 softmax,
which changes nothing.

glm (GlmForCausalLM, GLM-4-9B in transformers' own format) is the same model with q, k, v as
three matrices (`attention_bias` = q/k/v bias; o and the MLP have none), gate_up_proj fused
(first half gate), and rotary on int(head_dim * partial_rotary_factor) dims with interleaved
pairs. glm4 (Glm4ForCausalLM, GLM-4-0414) adds a norm after each sublayer's output:
post_self_attn_layernorm and post_mlp_layernorm (lmzoo's post_sublayer_norm). Fields a config.json
leaves out take GlmConfig's defaults (head_dim 128, partial_rotary_factor 0.5, ...).
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import LmzooError
from .hf import HFFormat, activation, read_rope, write_rope
from .hf_glm1 import is_glm1, refuse_thudm_options
from .names import Mapped, NameTable

# ============================================================================= chatglm (remote code)
# THUDM's code lives on the hub; a written directory points there (trust_remote_code). GLM-4-9B-chat's
# modeling_chatglm.py reads every field written below, rope_ratio included.
REMOTE_CODE_REPO = "THUDM/glm-4-9b-chat"
ROPE_BASE = 10000.0  # THUDM's RotaryEmbedding: base = 10000 * rope_ratio
INTERPOLATING_REPO = "THUDM/chatglm2-6b-32k"  # whose code divides the positions by rope_ratio instead


def interpolates_positions(hf: dict) -> bool:
    """Whether config.json is ChatGLM2-6B-32K's, whose rope_ratio divides the positions."""
    marks = [hf.get("_name_or_path")] + list((hf.get("auto_map") or {}).values())
    return any(isinstance(m, str) and INTERPOLATING_REPO.split("/")[1] in m.lower() for m in marks)


def grouped_qkv(hf: dict) -> bool:
    """ChatGLM2+ with multi_query_attention: q|k|v rows all-Q | all-K | all-V."""
    return not is_glm1(hf) and bool(hf.get("multi_query_attention", False))


def per_head_qkv(hf: dict) -> bool:
    """ChatGLM2+ without multi_query_attention (ChatGLMConfig's default): q|k|v rows per head."""
    return not is_glm1(hf) and not hf.get("multi_query_attention", False)


def read_chatglm_config(hf: dict, source: str = "config.json") -> dict:
    if is_glm1(hf):
        raise LmzooError(f"{source}: a GLM v1 (ChatGLM-6B) config (position_encoding_2d / inner_hidden_size) "
                         "is not a ChatGLM2/3 or GLM-4 one")
    refuse_thudm_options(hf, source)
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    # ChatGLMConfig's kv_channels defaults to 128; the model uses hidden_size // heads only for null.
    head_dim = hf.get("kv_channels", 128) or d // n_heads
    rope_ratio = hf.get("rope_ratio", 1)
    if isinstance(rope_ratio, bool) or not isinstance(rope_ratio, (int, float)) or rope_ratio <= 0:
        raise LmzooError(f"{source}: rope_ratio={rope_ratio!r} must be a positive number "
                         "(the rotary base is 10000 * rope_ratio)")
    if head_dim % 4:
        raise LmzooError(f"{source}: kv_channels={head_dim} must be a multiple of 4: ChatGLM rotates "
                         "kv_channels // 2 dims in pairs, which lmzoo reproduces only when that is even")
    if hf.get("multi_query_attention", False):
        n_kv = hf.get("multi_query_group_num", 1)
        if not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
            raise LmzooError(f"{source}: multi_query_group_num={n_kv!r} must divide "
                             f"num_attention_heads={n_heads}")
    else:
        n_kv = n_heads
    rmsnorm = hf.get("rmsnorm", True)
    if not isinstance(rmsnorm, bool):
        raise LmzooError(f"{source}: rmsnorm={rmsnorm!r} must be true (RMSNorm) or false (LayerNorm)")
    bias_linear = bool(hf.get("add_bias_linear", False))
    return dict(
        family="chatglm", vocab_size=hf["padded_vocab_size"], n_layers=hf["num_layers"], d_model=d,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, d_ff=hf["ffn_hidden_size"],
        max_seq_len=hf.get("seq_length", 2048),
        norm="rmsnorm" if rmsnorm else "layernorm", norm_bias=not rmsnorm,
        norm_eps=float(hf.get("layernorm_epsilon", 1e-5)),
        norm_position="deepnorm" if hf.get("apply_residual_connection_post_layernorm", False) else "pre",
        residual_scale=1.0, final_norm=bool(hf.get("post_layer_norm", True)),
        positions="rope", rope_fraction=0.5, rope_pairing="interleaved",
        **({"rope_base": ROPE_BASE, "rope_scaling": "linear", "rope_factor": float(rope_ratio)}
           if interpolates_positions(hf) and rope_ratio != 1 else {"rope_base": ROPE_BASE * float(rope_ratio)}),
        fused_qkv=True, qkv_bias=bias_linear or bool(hf.get("add_qkv_bias", False)), o_bias=bias_linear,
        mlp="swiglu", activation="silu", mlp_bias=bias_linear, fused_gate_up=True, tie_embeddings=False,
    )


def _cannot(fmt: str, what: str) -> LmzooError:
    return LmzooError(f"{fmt} cannot express {what}")


def _check_common(c: Config, fmt: str) -> None:
    """What none of the GLM formats can say: lmzoo features outside THUDM's and transformers' GLM code."""
    unsupported = {
        "positions": (c.positions, "rope"), "mlp": (c.mlp, "swiglu"), "n_experts": (c.n_experts, 0),
        "sliding_window": (c.sliding_window, None), "lm_type": (c.lm_type, "causal"),
        "attention_pattern": (c.attention_pattern, "dense"), "logn_attention": (c.logn_attention, False),
        "max_context": (c.max_context, None), "rope_pairing": (c.rope_pairing, "interleaved"),
        "fused_gate_up": (c.fused_gate_up, True),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise _cannot(fmt, f"Config.{name}={value!r} (it needs {needed!r})")


def write_chatglm_config(c: Config) -> dict:
    fmt = "chatglm"
    _check_common(c, fmt)
    if c.norm_position == "deepnorm" and c.residual_scale != 1.0:
        raise _cannot(fmt, f"Config.residual_scale={c.residual_scale} (the normed-input residual has scale 1)")
    if c.norm_position not in ("pre", "deepnorm") or c.post_sublayer_norm:
        raise _cannot(fmt, f"Config.norm_position={c.norm_position!r} with post_sublayer_norm={c.post_sublayer_norm}")
    if c.norm_bias != (c.norm == "layernorm"):
        raise _cannot(fmt, f"Config.norm={c.norm!r} with norm_bias={c.norm_bias} (its LayerNorm has a bias, "
                           "its RMSNorm none)")
    interpolated = c.rope_scaling == "linear" and c.rope_base == ROPE_BASE  # ChatGLM2-6B-32K's meaning
    if c.rope_fraction != 0.5 or (c.rope_scaling is not None and not interpolated) or c.head_size % 4:
        raise _cannot(fmt, f"rotary with rope_fraction={c.rope_fraction}, rope_scaling={c.rope_scaling!r}, "
                           f"head_dim={c.head_size} (it rotates half of a head_dim divisible by 4, unscaled, "
                           "or with positions interpolated from base 10000 as ChatGLM2-6B-32K)")
    if not c.fused_qkv or c.activation != "silu":
        raise _cannot(fmt, f"Config.fused_qkv={c.fused_qkv}, activation={c.activation!r}")
    if c.o_bias != c.mlp_bias or (c.o_bias and not c.qkv_bias):
        raise _cannot(fmt, f"biases qkv={c.qkv_bias}, o={c.o_bias}, mlp={c.mlp_bias} (add_bias_linear covers "
                           "o, the MLP and q|k|v together; add_qkv_bias q|k|v alone)")
    if c.tie_embeddings:
        raise _cannot(fmt, "Config.tie_embeddings=True (THUDM's code never ties output_layer to the embedding)")
    return dict(
        num_layers=c.n_layers, padded_vocab_size=c.vocab_size, hidden_size=c.d_model,
        num_attention_heads=c.n_heads, kv_channels=c.head_size, multi_query_attention=True,
        multi_query_group_num=c.kv_heads, ffn_hidden_size=c.d_ff, seq_length=c.max_seq_len,
        layernorm_epsilon=c.norm_eps, rmsnorm=c.norm == "rmsnorm", add_bias_linear=c.o_bias,
        add_qkv_bias=c.qkv_bias, apply_residual_connection_post_layernorm=c.norm_position == "deepnorm",
        post_layer_norm=c.final_norm, rope_ratio=_rope_ratio(c), original_rope=True,
        **({"_name_or_path": INTERPOLATING_REPO} if c.rope_scaling == "linear" else {}),
        tie_word_embeddings=False, quantization_bit=0, pre_seq_len=None, prefix_projection=False,
        hidden_dropout=0.0, attention_dropout=0.0, apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True, fp32_residual_connection=False, use_cache=True,
    )


def _rope_ratio(c: Config) -> float | int:
    ratio = c.rope_factor if c.rope_scaling == "linear" else c.rope_base / ROPE_BASE
    return int(ratio) if ratio.is_integer() else ratio  # 500, as the published configs write it


def write_per_head_config(c: Config) -> dict:
    raise LmzooError("chatglm without multi_query_attention is read only; lmzoo writes "
                     "multi_query_attention=true (groups = heads for multi-head attention)")


def chatglm_remote_code(c: Config) -> dict:
    repo = INTERPOLATING_REPO if c.rope_scaling == "linear" else REMOTE_CODE_REPO  # the code that reads it so
    model = f"{repo}--modeling_chatglm.ChatGLMForConditionalGeneration"
    return {"auto_map": {
        "AutoConfig": f"{repo}--configuration_chatglm.ChatGLMConfig",
        "AutoModel": model, "AutoModelForCausalLM": model, "AutoModelForSeq2SeqLM": model,
    }}


# ----------------------------------------------------------------------------- qkv layout (multi-head)
def _qkv_rows(t: torch.Tensor, c: Config) -> tuple[int, int] | None:
    n, hd = c.n_heads, c.head_size
    return (n, hd) if t.shape[0] == 3 * n * hd else None  # a wrong shape is reported by the shape check


def per_head_qkv_to_ours(t: torch.Tensor, c: Config) -> torch.Tensor:
    """Rows [head, (q|k|v), head_dim] -> [(q|k|v), head, head_dim] (all-Q | all-K | all-V)."""
    rows = _qkv_rows(t, c)
    if rows is None:
        return t
    n, hd = rows
    return t.reshape(n, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def per_head_qkv_to_theirs(t: torch.Tensor, c: Config) -> torch.Tensor:
    """The inverse: all-Q | all-K | all-V -> each head's q, k, v side by side."""
    rows = _qkv_rows(t, c)
    if rows is None:
        return t
    n, hd = rows
    return t.reshape(3, n, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


_W = ("weight", "bias")
_LAYER = "transformer.encoder.layers.{i}"
CHATGLM_NAMES = {
    "transformer.embedding.word_embeddings.weight": "tok_emb.weight",
    "transformer.output_layer.weight": "lm_head.weight",
    **{f"transformer.encoder.final_layernorm.{w}": f"final_norm.{w}" for w in _W},
    **{f"{_LAYER}.input_layernorm.{w}": f"blocks.{{i}}.attn_norm.{w}" for w in _W},
    **{f"{_LAYER}.self_attention.query_key_value.{w}": f"blocks.{{i}}.attn.qkv.{w}" for w in _W},
    **{f"{_LAYER}.self_attention.dense.{w}": f"blocks.{{i}}.attn.o.{w}" for w in _W},
    **{f"{_LAYER}.post_attention_layernorm.{w}": f"blocks.{{i}}.mlp_norm.{w}" for w in _W},
    **{f"{_LAYER}.mlp.dense_h_to_4h.{w}": f"blocks.{{i}}.mlp.gate_up.{w}" for w in _W},  # gate | up
    **{f"{_LAYER}.mlp.dense_4h_to_h.{w}": f"blocks.{{i}}.mlp.down.{w}" for w in _W},
}
CHATGLM_PER_HEAD_NAMES = {
    **CHATGLM_NAMES,
    **{f"{_LAYER}.self_attention.query_key_value.{w}":
       Mapped(f"blocks.{{i}}.attn.qkv.{w}", per_head_qkv_to_ours, per_head_qkv_to_theirs) for w in _W},
}
# THUDM's RotaryEmbedding registers inv_freq as a buffer (saved with the weights) but recomputes it.
CHATGLM_IGNORED = ["transformer.rotary_pos_emb.inv_freq"]


# ============================================================================= transformers' glm and glm4
GLM_DEFAULTS = dict(num_key_value_heads=2, head_dim=128, rms_norm_eps=1.5625e-07, attention_bias=True,
                    max_position_embeddings=131072, partial_rotary_factor=0.5)  # GlmConfig's
HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}  # -> hidden_act


def read_glm_config(hf: dict, source: str = "config.json") -> dict:
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim", GLM_DEFAULTS["head_dim"]) or hf["hidden_size"] // n_heads
    rope = read_rope(hf, source)
    rope.setdefault("rope_fraction", GLM_DEFAULTS["partial_rotary_factor"])
    if int(head_dim * rope["rope_fraction"]) % 2:
        raise LmzooError(f"{source}: partial_rotary_factor={rope['rope_fraction']} turns "
                         f"int({head_dim} * {rope['rope_fraction']}) = {int(head_dim * rope['rope_fraction'])} "
                         "dims of each head, an odd number; lmzoo rotates whole pairs")
    return dict(
        family="glm4", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads", GLM_DEFAULTS["num_key_value_heads"]) or n_heads,
        head_dim=head_dim, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", GLM_DEFAULTS["max_position_embeddings"]),
        norm_eps=float(hf.get("rms_norm_eps", GLM_DEFAULTS["rms_norm_eps"])),
        activation=activation(hf, "hidden_act", source), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", GLM_DEFAULTS["attention_bias"])), o_bias=False, mlp_bias=False,
        fused_gate_up=True, rope_pairing="interleaved", **rope,
    )


def read_glm4_config(hf: dict, source: str = "config.json") -> dict:
    return {**read_glm_config(hf, source), "post_sublayer_norm": True}


def _write_glm(c: Config, fmt: str, sandwich: bool) -> dict:
    _check_common(c, fmt)
    if c.norm != "rmsnorm" or c.norm_position != "pre" or not c.final_norm or c.post_sublayer_norm != sandwich:
        raise _cannot(fmt, f"Config.norm={c.norm!r}, norm_position={c.norm_position!r}, final_norm={c.final_norm}, "
                           f"post_sublayer_norm={c.post_sublayer_norm} (it needs pre-norm RMSNorm, a final norm"
                           f"{' and' if sandwich else ' and no'} post-sublayer norms)")
    if c.fused_qkv or c.o_bias or c.mlp_bias:
        raise _cannot(fmt, f"Config.fused_qkv={c.fused_qkv}, o_bias={c.o_bias}, mlp_bias={c.mlp_bias}")
    return dict(
        vocab_size=c.vocab_size, num_hidden_layers=c.n_layers, hidden_size=c.d_model,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
        intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        hidden_act=HIDDEN_ACT[c.activation], tie_word_embeddings=c.tie_embeddings, attention_bias=c.qkv_bias,
        # GlmConfig's default pad_token_id is GLM-4's 151329, outside a smaller vocabulary (the embedding
        # refuses it); lmzoo does not know the padding token, so it says none.
        pad_token_id=None,
        # GlmConfig reads a missing partial_rotary_factor as 0.5, so it is always written.
        **{**write_rope(c), "partial_rotary_factor": c.rope_fraction},
    )


def write_glm_config(c: Config) -> dict:
    return _write_glm(c, "glm", sandwich=False)


def write_glm4_config(c: Config) -> dict:
    return _write_glm(c, "glm4", sandwich=True)


GLM_NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"blocks.{{i}}.attn.{p}.{w}" for p in "qkv" for w in _W},
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blocks.{i}.mlp.gate_up.weight",  # gate | up
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down.weight",
}
GLM4_NAMES = {
    **GLM_NAMES,
    "model.layers.{i}.post_self_attn_layernorm.weight": "blocks.{i}.attn_post_norm.weight",
    "model.layers.{i}.post_mlp_layernorm.weight": "blocks.{i}.mlp_post_norm.weight",
}
GLM_IGNORED = ["model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"]

FORMATS = [
    HFFormat("chatglm", "ChatGLMModel", NameTable(CHATGLM_NAMES, ignore=CHATGLM_IGNORED), read_chatglm_config,
             write_chatglm_config, "chatglm", matches=grouped_qkv, extra_files=chatglm_remote_code),
    HFFormat("chatglm", "ChatGLMModel", NameTable(CHATGLM_PER_HEAD_NAMES, ignore=CHATGLM_IGNORED),
             read_chatglm_config, write_per_head_config, "chatglm", matches=per_head_qkv,
             extra_files=chatglm_remote_code),
    HFFormat("glm", "GlmForCausalLM", NameTable(GLM_NAMES, ignore=GLM_IGNORED), read_glm_config,
             write_glm_config, "glm4"),
    HFFormat("glm4", "Glm4ForCausalLM", NameTable(GLM4_NAMES, ignore=GLM_IGNORED), read_glm4_config,
             write_glm4_config, "glm4"),
]
