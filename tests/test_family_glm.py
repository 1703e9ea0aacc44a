"""ChatGLM2/3 and GLM-4: transformers' glm and glm4, and THUDM's chatglm (remote code) format.

Oracles: tiny random GlmForCausalLM / Glm4ForCausalLM for the native formats; for chatglm, a
GlmForCausalLM's weights rewritten into THUDM's names (the mapping is spelled out below), and an
independent small forward pass written from the semantics of THUDM's modeling_chatglm.py for
what GlmForCausalLM cannot express (LayerNorm, add_bias_linear, the post-layernorm residual,
multi-head per-head q|k|v, no final norm).
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from hf_oracle import assert_round_trip_through_transformers, ids, save, tiny_hf_model
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.config import Config
from lmzoo.formats import hf_glm, registry
from lmzoo.nn.rope import apply_rope, rope_tables

VOCAB = 97
# GlmConfig defaults to head_dim 128 and GLM-4's token ids; a tiny model sets its own.
GLM_TINY = dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1)


def assert_logits(got, expected):
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ============================================================================= native glm / glm4
NATIVE = {
    "glm": ("glm", {}),
    "glm-mha-tied-no-bias": ("glm", dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=False)),
    "glm-quarter-rotary-big-base": ("glm", dict(rope_theta=5e6, partial_rotary_factor=0.25)),
    "glm4": ("glm4", {}),
    "glm4-mqa": ("glm4", dict(num_key_value_heads=1)),
}


def native_oracle(case):
    model_type, overrides = NATIVE[case]
    return tiny_hf_model(model_type, **{**GLM_TINY, **overrides})


@pytest.mark.parametrize("case", NATIVE)
def test_native_logits_equal_transformers(case, tmp_path):
    oracle = native_oracle(case)
    ours, _ = lmzoo.load(save(oracle, tmp_path / "ckpt"))
    c = ours.config
    assert (c.rope_pairing, c.fused_gate_up, c.fused_qkv, c.head_size) == ("interleaved", True, False, 16)
    assert c.post_sublayer_norm == (NATIVE[case][0] == "glm4")
    assert c.rope_fraction == oracle.config.rope_parameters["partial_rotary_factor"]
    x = ids(length=30)
    with torch.no_grad():
        assert_logits(ours(x), oracle(x).logits)


@pytest.mark.parametrize("case", ["glm", "glm-quarter-rotary-big-base", "glm4"])
def test_native_round_trip_through_transformers(case, tmp_path):
    assert_round_trip_through_transformers(native_oracle(case), tmp_path, length=20)


# ============================================================================= THUDM's semantics
def thudm_rope(x, positions, head_dim, rope_ratio):
    """ChatGLM2+'s rotary on x [B, T, H, D]: the first head_dim // 2 dims turn, in pairs (2i, 2i+1),
    with angles position * (10000 * rope_ratio) ** (-2i / (head_dim // 2)); the rest pass through."""
    n = head_dim // 2
    theta = 1.0 / (10000 * rope_ratio) ** (torch.arange(0, n, 2, dtype=torch.float32) / n)
    angle = positions.float()[:, None] * theta  # [T, n/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    rot, rest = x[..., :n], x[..., n:]
    a, b = rot.unflatten(-1, (n // 2, 2)).unbind(-1)
    return torch.cat([torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2), rest], -1)


def thudm_forward(cfg, w, tokens):
    """Logits of a chatglm checkpoint {name: tensor} as THUDM's code computes them (eager, fp32)."""
    H, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    mqa = cfg.get("multi_query_attention", False)
    G = cfg["multi_query_group_num"] if mqa else H
    eps, post_ln_residual = cfg["layernorm_epsilon"], cfg.get("apply_residual_connection_post_layernorm", False)

    def norm(x, name):
        if cfg.get("rmsnorm", True):
            return w[name + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    B, T = tokens.shape
    positions = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["transformer.embedding.word_embeddings.weight"][tokens]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = norm(x, p + "input_layernorm")
        mixed = linear(h, p + "self_attention.query_key_value")
        if mqa:  # all-Q | all-K | all-V
            q, k, v = mixed.split([H * hd, G * hd, G * hd], -1)
            q, k, v = q.unflatten(-1, (H, hd)), k.unflatten(-1, (G, hd)), v.unflatten(-1, (G, hd))
        else:  # each head's q, k, v side by side
            q, k, v = mixed.unflatten(-1, (H, 3 * hd)).split(hd, -1)
        q = thudm_rope(q, positions, hd, cfg.get("rope_ratio", 1))
        k = thudm_rope(k, positions, hd, cfg.get("rope_ratio", 1))
        k, v = k.repeat_interleave(H // G, 2), v.repeat_interleave(H // G, 2)  # group g serves heads g*H/G..
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(-2)
        x = (h if post_ln_residual else x) + linear(ctx, p + "self_attention.dense")
        h = norm(x, p + "post_attention_layernorm")
        gate, up = linear(h, p + "mlp.dense_h_to_4h").chunk(2, -1)
        x = (h if post_ln_residual else x) + linear(F.silu(gate) * up, p + "mlp.dense_4h_to_h")
    if cfg.get("post_layer_norm", True):
        x = norm(x, "transformer.encoder.final_layernorm")
    return linear(x, "transformer.output_layer")


CHATGLM_BASE = dict(
    model_type="chatglm", architectures=["ChatGLMModel"], num_layers=2, padded_vocab_size=VOCAB, hidden_size=64,
    num_attention_heads=4, kv_channels=16, multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=96,
    seq_length=128, layernorm_epsilon=1e-5, rmsnorm=True, add_bias_linear=False, add_qkv_bias=True,
    apply_residual_connection_post_layernorm=False, post_layer_norm=True, rope_ratio=500, original_rope=True,
    tie_word_embeddings=False, torch_dtype="float32",
)
CHATGLM_VARIANTS = {
    "glm4-gqa-rope-ratio-500": {},
    "chatglm2-one-group-no-rope-ratio": dict(multi_query_group_num=1, rope_ratio=None),
    "mha-per-head-qkv": dict(multi_query_attention=False, multi_query_group_num=1),
    "layernorm-bias-linear": dict(rmsnorm=False, add_bias_linear=True, add_qkv_bias=False, rope_ratio=3),
    "post-ln-residual-no-final-norm-narrow-heads": dict(apply_residual_connection_post_layernorm=True,
                                                        post_layer_norm=False, kv_channels=8),
}


def chatglm_config(variant):
    cfg = {**CHATGLM_BASE, **CHATGLM_VARIANTS[variant]}
    return {k: v for k, v in cfg.items() if v is not None}


def random_chatglm_tensors(cfg, seed=0):
    """Random weights under THUDM's names and shapes, norms and biases included."""
    g = torch.Generator().manual_seed(seed)
    D, H, hd, Fd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"], cfg["ffn_hidden_size"]
    G = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else H
    layernorm, bias_all = not cfg.get("rmsnorm", True), cfg.get("add_bias_linear", False)

    def rand(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    t = {"transformer.embedding.word_embeddings.weight": rand(cfg["padded_vocab_size"], D, scale=1.0),
         "transformer.output_layer.weight": rand(cfg["padded_vocab_size"], D),
         "transformer.rotary_pos_emb.inv_freq": torch.ones(hd // 4)}  # a saved buffer, never loaded

    def norm(name):
        t[name + ".weight"] = 1 + rand(D, scale=0.1)
        if layernorm:
            t[name + ".bias"] = rand(D, scale=0.1)

    def linear(name, out, inp, bias):
        t[name + ".weight"] = rand(out, inp)
        if bias:
            t[name + ".bias"] = rand(out, scale=0.1)

    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.query_key_value", (H + 2 * G) * hd, D, bias_all or cfg.get("add_qkv_bias"))
        linear(p + "self_attention.dense", D, H * hd, bias_all)
        norm(p + "post_attention_layernorm")
        linear(p + "mlp.dense_h_to_4h", 2 * Fd, D, bias_all)
        linear(p + "mlp.dense_4h_to_h", D, Fd, bias_all)
    if cfg.get("post_layer_norm", True):
        norm("transformer.encoder.final_layernorm")
    return t


def write_dir(path, cfg, tensors):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def chatglm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm")
    out = {}
    for variant in CHATGLM_VARIANTS:
        cfg = chatglm_config(variant)
        out[variant] = (write_dir(root / variant, cfg, random_chatglm_tensors(cfg)), cfg)
    return out


def test_rotary_is_thudm_chatglm_and_transformers_glm():
    """Half the head dims, interleaved pairs, base 10000 * rope_ratio: lmzoo, THUDM and GlmForCausalLM agree."""
    hd, rope_ratio, T = 16, 500, 40
    x = torch.randn(2, 3, T, hd)  # [B, H, T, D]
    positions = torch.arange(T).expand(2, T)
    c = Config(**hf_glm.read_chatglm_config(chatglm_config("glm4-gqa-rope-ratio-500")))
    assert (c.rope_dims, c.rope_pairing, c.rope_base) == (hd // 2, "interleaved", 10000.0 * rope_ratio)
    ours = apply_rope(x.transpose(1, 2), rope_tables(c, positions), c.rope_pairing).transpose(1, 2)
    thudm = thudm_rope(x.transpose(1, 2), torch.arange(T), hd, rope_ratio).transpose(1, 2)
    glm = transformers.models.glm.modeling_glm
    hf_config = transformers.GlmConfig(hidden_size=48, num_attention_heads=3, head_dim=hd,
                                       rope_theta=10000.0 * rope_ratio, partial_rotary_factor=0.5)
    cos, sin = glm.GlmRotaryEmbedding(hf_config)(x, positions)
    hf, _ = glm.apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(ours, thudm, atol=1e-6, rtol=0)
    torch.testing.assert_close(hf, thudm, atol=1e-6, rtol=0)
    assert torch.equal(ours[..., hd // 2:], x[..., hd // 2:])  # the second half passes through
    assert not torch.allclose(ours[..., :hd // 2], x[..., :hd // 2])
    # the base matters within these 40 positions: rope_ratio 1 turns the same dims differently
    assert not torch.allclose(thudm_rope(x.transpose(1, 2), torch.arange(T), hd, 1).transpose(1, 2), ours, atol=1e-3)


# ============================================================================= chatglm from a glm oracle
def chatglm_from_glm(oracle, rope_ratio):
    """A GlmForCausalLM's weights and config, rewritten as THUDM's chatglm checkpoint."""
    s, hc = oracle.state_dict(), oracle.config
    t = {"transformer.embedding.word_embeddings.weight": s["model.embed_tokens.weight"],
         "transformer.encoder.final_layernorm.weight": s["model.norm.weight"],
         "transformer.output_layer.weight": s["lm_head.weight"]}
    for i in range(hc.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for w in ("weight", "bias"):  # q | k | v rows (and biases) stacked: all-Q | all-K | all-V
            t[q + f"self_attention.query_key_value.{w}"] = torch.cat(
                [s[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
        t[q + "input_layernorm.weight"] = s[p + "input_layernorm.weight"]
        t[q + "self_attention.dense.weight"] = s[p + "self_attn.o_proj.weight"]
        t[q + "post_attention_layernorm.weight"] = s[p + "post_attention_layernorm.weight"]
        t[q + "mlp.dense_h_to_4h.weight"] = s[p + "mlp.gate_up_proj.weight"]  # gate | up, same order
        t[q + "mlp.dense_4h_to_h.weight"] = s[p + "mlp.down_proj.weight"]
    cfg = dict(
        model_type="chatglm", architectures=["ChatGLMModel"], num_layers=hc.num_hidden_layers,
        padded_vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, num_attention_heads=hc.num_attention_heads,
        kv_channels=hc.head_dim, multi_query_attention=True, multi_query_group_num=hc.num_key_value_heads,
        ffn_hidden_size=hc.intermediate_size, seq_length=hc.max_position_embeddings,
        layernorm_epsilon=hc.rms_norm_eps, rmsnorm=True, add_bias_linear=False, add_qkv_bias=True,
        apply_residual_connection_post_layernorm=False, post_layer_norm=True, original_rope=True,
        tie_word_embeddings=False,
    )
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    return cfg, {k: v.clone() for k, v in t.items()}


@pytest.mark.parametrize("rope_ratio", [None, 500], ids=["chatglm2", "glm4-rope-ratio-500"])
def test_chatglm_equals_glm_oracle(rope_ratio, tmp_path):
    oracle = tiny_hf_model("glm", **GLM_TINY, rope_theta=10000.0 * (rope_ratio or 1))
    cfg, tensors = chatglm_from_glm(oracle, rope_ratio)
    ours, _ = lmzoo.load(write_dir(tmp_path / "m", cfg, tensors))
    assert ours.config.family == "chatglm" and ours.config.fused_qkv
    x = ids(length=40)
    with torch.no_grad():
        expected = oracle(x).logits
        assert_logits(ours(x), expected)
        assert_logits(thudm_forward(cfg, tensors, x), expected)  # the reference agrees with the oracle too


@pytest.mark.parametrize("variant", CHATGLM_VARIANTS)
def test_chatglm_equals_thudm_reference(variant, chatglm_dirs):
    path, cfg = chatglm_dirs[variant]
    ours, _ = lmzoo.load(path)
    x = ids(length=24)
    with torch.no_grad():
        assert_logits(ours(x), thudm_forward(cfg, load_file(os.path.join(path, "model.safetensors")), x))


def test_chatglm_fields_map_to_config(chatglm_dirs):
    c = lmzoo.load(chatglm_dirs["post-ln-residual-no-final-norm-narrow-heads"][0])[0].config
    assert (c.norm_position, c.residual_scale, c.final_norm, c.head_size, c.d_model) == ("deepnorm", 1.0, False, 8, 64)
    c = lmzoo.load(chatglm_dirs["layernorm-bias-linear"][0])[0].config
    assert (c.norm, c.norm_bias, c.qkv_bias, c.o_bias, c.mlp_bias, c.rope_base) == (
        "layernorm", True, True, True, True, 30000.0)
    c = lmzoo.load(chatglm_dirs["mha-per-head-qkv"][0])[0].config
    assert (c.kv_heads, c.fused_qkv) == (4, True)
    c = lmzoo.load(chatglm_dirs["chatglm2-one-group-no-rope-ratio"][0])[0].config
    assert (c.kv_heads, c.rope_base, c.rope_fraction, c.tie_embeddings) == (1, 10000.0, 0.5, False)


# ============================================================================= cache, batching, saving
@pytest.mark.parametrize("variant", ["glm4-gqa-rope-ratio-500", "post-ln-residual-no-final-norm-narrow-heads"])
def test_kv_cache_decoding_equals_full_forward(variant, chatglm_dirs):
    model, _ = lmzoo.load(chatglm_dirs[variant][0])
    x = ids(length=20, seed=3)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        parts, start = [], 0
        for n in [7, 1, 1, 5, 6]:
            parts.append(model(x[:, start:start + n], cache=cache))
            start += n
    assert_logits(torch.cat(parts, 1), full)


def test_batched_left_padded_generation_equals_each_prompt_alone(chatglm_dirs):
    model, _ = lmzoo.load(chatglm_dirs["glm4-gqa-rope-ratio-500"][0])
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [4, 4, 9, 30, 2, 7]]
    batched = model.generate(prompts, max_new_tokens=10)
    for p, got in zip(prompts, batched, strict=True):
        assert got == model.generate(torch.tensor([p]), max_new_tokens=10)[0].tolist()
        assert len(got) == len(p) + 10


@pytest.mark.parametrize("variant", ["glm4-gqa-rope-ratio-500", "mha-per-head-qkv", "layernorm-bias-linear"])
def test_save_writes_chatglm_and_reloads_identically(variant, chatglm_dirs, tmp_path):
    path, cfg = chatglm_dirs[variant]
    ours, _ = lmzoo.load(path)
    out = lmzoo.save_hf_dir(ours, tmp_path / "saved")
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == "chatglm" and written["architectures"] == ["ChatGLMModel"]
    assert written["auto_map"]["AutoModelForCausalLM"].endswith("modeling_chatglm.ChatGLMForConditionalGeneration")
    assert written["multi_query_attention"] is True
    assert written["multi_query_group_num"] == (cfg["multi_query_group_num"] if cfg["multi_query_attention"] else 4)
    for key in ("rope_ratio", "rmsnorm", "add_bias_linear", "kv_channels", "post_layer_norm", "seq_length"):
        assert written[key] == cfg[key], key
    original = load_file(os.path.join(path, "model.safetensors"))
    original.pop("transformer.rotary_pos_emb.inv_freq")
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved.keys() == original.keys()
    if cfg["multi_query_attention"]:  # the same layout: the same tensors
        assert all(torch.equal(saved[k], original[k]) for k in saved)
    else:  # rewritten all-Q | all-K | all-V, as multi_query_attention=true with 4 groups reads it
        qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
        assert not torch.equal(saved[qkv], original[qkv])
        assert torch.equal(saved[qkv], torch.cat([original[qkv].unflatten(0, (4, 3, 16))[:, j].flatten(0, 1)
                                                  for j in range(3)]))
    again, _ = lmzoo.load(out)
    assert again.config == ours.config
    x = ids(length=16)
    with torch.no_grad():
        assert_logits(again(x), ours(x))
        assert_logits(again(x), thudm_forward(written, saved, x))


# ============================================================================= presets vs published configs
# config.json architecture fields as published on the hub (THUDM/chatglm2-6b, THUDM/chatglm3-6b, THUDM/glm-4-9b-chat).
PUBLISHED_COMMON = dict(
    model_type="chatglm", add_bias_linear=False, add_qkv_bias=True, apply_residual_connection_post_layernorm=False,
    ffn_hidden_size=13696, hidden_size=4096, kv_channels=128, multi_query_attention=True, multi_query_group_num=2,
    num_attention_heads=32, original_rope=True, post_layer_norm=True, rmsnorm=True, tie_word_embeddings=False,
)
PUBLISHED = {
    "chatglm2-6b": dict(num_layers=28, padded_vocab_size=65024, layernorm_epsilon=1e-05, seq_length=32768),
    "chatglm3-6b": dict(num_layers=28, padded_vocab_size=65024, layernorm_epsilon=1e-05, seq_length=8192),
    "glm4-9b": dict(num_layers=40, padded_vocab_size=151552, layernorm_epsilon=1.5625e-07, seq_length=131072,
                    rope_ratio=500),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_equal_published_configs(name):
    read, _ = registry.config_from_hf({**PUBLISHED_COMMON, **PUBLISHED[name]}, name)
    preset = lmzoo.preset(name)
    skip = {"family", "init_std"}
    got = {k: v for k, v in read.replace(head_dim=read.head_size).to_dict().items() if k not in skip}
    want = {k: v for k, v in preset.replace(head_dim=preset.head_size).to_dict().items() if k not in skip}
    assert got == want
    assert registry.format_that_expresses(preset).model_type == "chatglm"


# ============================================================================= bad input
def edited_chatglm_dir(tmp_path, drop=(), **changes):
    good = chatglm_config("glm4-gqa-rope-ratio-500")
    cfg = {k: v for k, v in {**good, **changes}.items() if k not in drop}
    return write_dir(tmp_path / "bad", cfg, random_chatglm_tensors(good))


@pytest.mark.parametrize("changes, message", [
    (dict(pre_seq_len=16), r"pre_seq_len=16 \(a P-tuning v2 prefix encoder\) is not supported"),
    (dict(quantization_bit=4), r"quantization_bit=4 .* is not supported"),
    (dict(kv_channels=6), r"kv_channels=6 must be a multiple of 4"),
    (dict(multi_query_group_num=3), r"multi_query_group_num=3 must divide num_attention_heads=4"),
    (dict(rmsnorm="yes"), r"rmsnorm='yes' must be true"),
    (dict(rope_ratio=0), r"rope_ratio=0 must be a positive number"),
    (dict(drop=["ffn_hidden_size"]), r"lacks the field 'ffn_hidden_size'"),
    (dict(ffn_hidden_size=80), r"mlp\.dense_h_to_4h\.weight has shape \[192, 64\], expected \[160, 64\]"),
])
def test_bad_chatglm_config_names_the_field(changes, message, tmp_path):
    with pytest.raises(lmzoo.LmzooError, match=message):
        lmzoo.load(edited_chatglm_dir(tmp_path, **changes))


def test_bad_per_head_qkv_shape_is_reported(chatglm_dirs, tmp_path):
    path, cfg = chatglm_dirs["mha-per-head-qkv"]
    t = load_file(os.path.join(path, "model.safetensors"))
    name = "transformer.encoder.layers.1.self_attention.query_key_value.weight"
    t[name] = t[name][:-16]
    shape = r"layers\.1\.self_attention\.query_key_value\.weight has shape \[176, 64\], expected \[192, 64\]"
    with pytest.raises(lmzoo.LmzooError, match=shape):
        lmzoo.load(write_dir(tmp_path / "m", cfg, t))


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3125}),
     r"partial_rotary_factor=0.3125 turns int\(16 \* 0.3125\) = 5 dims"),
    (dict(hidden_act="tanh"), r"hidden_act 'tanh' is not implemented"),
])
def test_bad_glm_config_names_the_field(changes, message, tmp_path):
    d = save(native_oracle("glm"), tmp_path / "m")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({**cfg, **changes}, f)
    with pytest.raises(lmzoo.LmzooError, match=message):
        lmzoo.load(d)


def test_glm1_configs_are_not_claimed():
    glm1 = dict(model_type="chatglm", position_encoding_2d=True, inner_hidden_size=16384, hidden_size=4096,
                num_attention_heads=32, num_layers=28, vocab_size=130528)
    chatglm_formats = [f for f in hf_glm.FORMATS if f.model_type == "chatglm"]
    assert len(chatglm_formats) == 2
    assert not any(f.matches(glm1) for f in chatglm_formats)
    assert [f.matches(chatglm_config("glm4-gqa-rope-ratio-500")) for f in chatglm_formats] == [True, False]
    assert [f.matches(chatglm_config("mha-per-head-qkv")) for f in chatglm_formats] == [False, True]
    with pytest.raises(lmzoo.LmzooError, match="GLM v1"):
        hf_glm.read_chatglm_config(glm1)


@pytest.mark.parametrize("field, value, message", [
    ("tie_embeddings", True, r"tie_embeddings=True \(THUDM's code never ties"),
    ("rope_fraction", 1.0, "rope_fraction=1.0"),
    ("post_sublayer_norm", True, "post_sublayer_norm=True"),
    ("mlp_bias", True, "biases qkv=True, o=False, mlp=True"),
])
def test_what_chatglm_cannot_write_is_an_error(field, value, message):
    c = lmzoo.preset("glm4-9b").replace(**{field: value})
    with pytest.raises(lmzoo.LmzooError, match=message):
        hf_glm.write_chatglm_config(c)


def thudm_rope_32k(x, positions, head_dim, rope_ratio):
    """ChatGLM2-6B-32K's own RotaryEmbedding: base 10000, positions divided by rope_ratio."""
    return thudm_rope(x, positions.float() / rope_ratio, head_dim, 1)


def test_chatglm2_32k_rope_ratio_divides_the_positions(tmp_path):
    """THUDM/chatglm2-6b-32k's code interpolates positions by rope_ratio; ChatGLM3/GLM-4's multiplies the
    base. config.json tells them apart by the repository it names; lmzoo reads each as its code does,
    and writes the 32K meaning back with its name and remote code."""
    hd, T = 16, 40
    x = torch.randn(2, T, 3, hd)
    hf = chatglm_config("glm4-gqa-rope-ratio-500")
    hf.update(rope_ratio=16, _name_or_path="THUDM/chatglm2-6b-32k")
    c = Config(**hf_glm.read_chatglm_config(hf))
    assert (c.rope_scaling, c.rope_factor, c.rope_base) == ("linear", 16.0, 10000.0)
    ours = apply_rope(x, rope_tables(c, torch.arange(T).expand(2, T)), c.rope_pairing)
    torch.testing.assert_close(ours, thudm_rope_32k(x, torch.arange(T), hd, 16), atol=1e-6, rtol=0)
    assert not torch.allclose(ours, thudm_rope(x, torch.arange(T), hd, 16), atol=1e-3)  # the other meaning
    c3 = Config(**hf_glm.read_chatglm_config({**hf, "_name_or_path": "THUDM/chatglm3-6b-32k"}))
    assert (c3.rope_scaling, c3.rope_base) == (None, 160000.0)
    written = hf_glm.write_chatglm_config(c)
    assert (written["rope_ratio"], written["_name_or_path"]) == (16, "THUDM/chatglm2-6b-32k")
    assert "chatglm2-6b-32k" in hf_glm.chatglm_remote_code(c)["auto_map"]["AutoModelForCausalLM"]
    assert Config(**hf_glm.read_chatglm_config({**hf, **written})) == c
    # and through GGUF: llama.cpp's linear rope scaling, the same positions
    from lmzoo.formats.gguf_write import save_gguf

    torch.manual_seed(0)
    model = lmzoo.from_config(c.replace(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, head_dim=hd))
    path, _ = save_gguf(model, tmp_path / "m.gguf", type="f32")
    back, _ = lmzoo.load(path)
    assert (back.config.rope_scaling, back.config.rope_factor) == ("linear", 16.0)
