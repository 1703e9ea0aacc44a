"""Qwen1 (model_type 'qwen', remote code QWenLMHeadModel): loading, saving, dynamic NTK, logn attention.

transformers has no Qwen1 class, so two oracles stand in for Qwen's remote code:
- a tiny random transformers Qwen2 model (MHA, q/k/v biases), whose weights are rewritten as a
  Qwen1 checkpoint by the mapping in `qwen1_dir_from_qwen2`: within the training length the two
  architectures compute the same function;
- `qwen1_reference`, Qwen1's forward pass written out here from the remote code's semantics
  (rotary over cache slots with an NTK alpha fixed at the prefill, logn query scaling by slot),
  itself checked against the Qwen2 oracle, for everything past the training length.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hf_oracle import ids, tiny_hf_model
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.formats import registry
from lmzoo.nn.generate import left_pad
from lmzoo.nn.model import logn_scale
from lmzoo.nn.rope import inverse_frequencies

S = 16  # seq_length (the training length) of the random Qwen1 checkpoints


# ----------------------------------------------------------------------------- Qwen1 by hand
def qwen_ntk_alpha(true_seq_len: int, seq_length: int) -> float:
    """QWenModel.get_ntk_alpha: a power-of-two step, 1 up to seq_length, then 3, 7, 15, ..."""
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def qwen_inv_freq(dim: int, base: float, alpha: float) -> torch.Tensor:
    """Qwen's RotaryEmbedding after update_rotary_pos_emb_cache(ntk_alpha=alpha)."""
    base = base * alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def qwen1_reference(w: dict, cfg: dict, x: torch.Tensor, alpha_len: int | None = None) -> torch.Tensor:
    """Logits of Qwen1's remote code in eval mode, for unpadded input starting at slot 0.

    alpha_len: the length whose NTK alpha rotates every position. Qwen computes alpha once, from
    the prefill's length, and keeps it while decoding from the cache; so the logits of a prompt
    of n tokens followed by cached decoding are this function's with alpha_len=n (default: the
    whole input, as one forward pass)."""
    B, T = x.shape
    d, H, seq_length = cfg["hidden_size"], cfg["num_attention_heads"], cfg["seq_length"]
    hd, eps = d // H, cfg["layer_norm_epsilon"]
    rot = hd if cfg["rotary_pct"] == 1.0 else int(cfg["kv_channels"] * cfg["rotary_pct"])
    alpha = qwen_ntk_alpha(alpha_len or T, seq_length) if cfg["use_dynamic_ntk"] else 1.0
    angles = torch.outer(torch.arange(T).float(), qwen_inv_freq(rot, cfg["rotary_emb_base"], alpha))
    angles = torch.cat([angles, angles], -1)[None, :, None, :]  # [1, T, 1, rot]: slots, not position_ids

    def rope(t):  # t: [B, T, H, hd]; rotate_half on the first `rot` dims
        r, rest = t[..., :rot], t[..., rot:]
        a, b = r.chunk(2, dim=-1)
        return torch.cat([r * angles.cos() + torch.cat([-b, a], -1) * angles.sin(), rest], -1)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(t, name):
        out = t @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    # logn_tensor: slot s (1-based i = s + 1) scales the query by log_{seq_length}(i) past seq_length.
    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, T + 1)])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = w["transformer.wte.weight"][x]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(rms(h, w[p + "ln_1.weight"]), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(B, T, H, hd) for t in (q, k, v))
        q, k = rope(q), rope(k)
        if cfg["use_logn_attn"]:
            q = q * logn[None, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        h = h + linear(y, p + "attn.c_proj")
        m = rms(h, w[p + "ln_2.weight"])
        h = h + linear(linear(m, p + "mlp.w1") * F.silu(linear(m, p + "mlp.w2")), p + "mlp.c_proj")
    h = rms(h, w["transformer.ln_f.weight"])
    return h @ w.get("lm_head.weight", w["transformer.wte.weight"]).T


# ----------------------------------------------------------------------------- checkpoints
def qwen1_config(**fields) -> dict:
    cfg = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
        "intermediate_size": 96, "seq_length": S, "max_position_embeddings": 4 * S, "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "use_dynamic_ntk": True, "use_logn_attn": True,
        "no_bias": True, "tie_word_embeddings": False,
    }
    cfg.update(fields)
    return cfg


def write_dir(path, cfg: dict, tensors: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def random_qwen1_weights(cfg: dict, seed: int = 0) -> dict:
    """Every tensor the remote code's QWenLMHeadModel holds, random (norms near 1)."""
    g = torch.Generator().manual_seed(seed)
    d, ff, V = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    w = {"transformer.wte.weight": rand(V, d, scale=0.2), "transformer.ln_f.weight": 1 + rand(d)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(V, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        w.update({p + "ln_1.weight": 1 + rand(d), p + "ln_2.weight": 1 + rand(d),
                  p + "attn.c_attn.weight": rand(3 * d, d), p + "attn.c_attn.bias": rand(3 * d),
                  p + "attn.c_proj.weight": rand(d, d), p + "mlp.w1.weight": rand(ff, d),
                  p + "mlp.w2.weight": rand(ff, d), p + "mlp.c_proj.weight": rand(d, ff)})
        if not cfg["no_bias"]:
            w.update({p + "attn.c_proj.bias": rand(d), p + "mlp.w1.bias": rand(ff), p + "mlp.w2.bias": rand(ff),
                      p + "mlp.c_proj.bias": rand(d)})
    return w


def qwen1_dir_from_qwen2(oracle, path, **fields):
    """Rewrite a transformers Qwen2 model (MHA) as a Qwen1 checkpoint directory. The mapping:

    model.embed_tokens                      -> transformer.wte
    layers.i.input_layernorm                -> transformer.h.i.ln_1
    layers.i.self_attn.{q,k,v}_proj rows    -> transformer.h.i.attn.c_attn (q | k | v, weights and biases)
    layers.i.self_attn.o_proj               -> transformer.h.i.attn.c_proj (no bias: no_bias=true)
    layers.i.post_attention_layernorm       -> transformer.h.i.ln_2
    layers.i.mlp.up_proj                    -> transformer.h.i.mlp.w1   (Qwen1: c_proj(w1(x) * silu(w2(x))))
    layers.i.mlp.gate_proj                  -> transformer.h.i.mlp.w2
    layers.i.mlp.down_proj                  -> transformer.h.i.mlp.c_proj
    model.norm                              -> transformer.ln_f
    lm_head                                 -> lm_head (absent when tied)
    and intermediate_size doubles: Qwen1's config counts w1 and w2 together.
    """
    hc = oracle.config
    sd = {k: v.detach().clone() for k, v in oracle.state_dict().items()}
    w = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"]}
    if not hc.tie_word_embeddings:
        w["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(hc.num_hidden_layers):
        o, p = f"model.layers.{i}.", f"transformer.h.{i}."
        a = o + "self_attn."
        w.update({
            p + "ln_1.weight": sd[o + "input_layernorm.weight"],
            p + "ln_2.weight": sd[o + "post_attention_layernorm.weight"],
            p + "attn.c_attn.weight": torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"]),
            p + "attn.c_attn.bias": torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"]),
            p + "attn.c_proj.weight": sd[a + "o_proj.weight"],
            p + "mlp.w1.weight": sd[o + "mlp.up_proj.weight"],
            p + "mlp.w2.weight": sd[o + "mlp.gate_proj.weight"],
            p + "mlp.c_proj.weight": sd[o + "mlp.down_proj.weight"],
        })
    cfg = qwen1_config(
        vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, num_hidden_layers=hc.num_hidden_layers,
        num_attention_heads=hc.num_attention_heads, kv_channels=hc.hidden_size // hc.num_attention_heads,
        intermediate_size=2 * hc.intermediate_size, layer_norm_epsilon=hc.rms_norm_eps,
        rotary_emb_base=hc.rope_parameters["rope_theta"], tie_word_embeddings=hc.tie_word_embeddings, **fields)
    return write_dir(path, cfg, w), w, cfg


ORACLE_CASES = {
    "plain": dict(use_dynamic_ntk=False, use_logn_attn=False),
    "ntk-and-logn-on": dict(use_dynamic_ntk=True, use_logn_attn=True),
    "tied": dict(use_dynamic_ntk=True, use_logn_attn=True, tie=True),
}


def oracle_checkpoint(case, tmp_path, seq_length=32):
    fields = dict(ORACLE_CASES[case])
    tie = fields.pop("tie", False)
    oracle = tiny_hf_model("qwen2", num_key_value_heads=4, tie_word_embeddings=tie)
    path, w, cfg = qwen1_dir_from_qwen2(oracle, tmp_path / case, seq_length=seq_length,
                                        max_position_embeddings=4 * seq_length, **fields)
    return oracle, path, w, cfg


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_qwen1_checkpoint_matches_the_qwen2_oracle(case, tmp_path):
    oracle, path, w, cfg = oracle_checkpoint(case, tmp_path)
    model, _ = lmzoo.load(path)
    c = model.config
    assert (c.family, c.fused_qkv, c.qkv_bias, c.o_bias, c.mlp_bias) == ("qwen", True, True, False, False)
    assert (c.d_ff, c.max_seq_len, c.max_context, c.tie_embeddings) == (96, 32, 128, case == "tied")
    assert (c.rope_scaling == "ntk_alpha", c.logn_attention) == (cfg["use_dynamic_ntk"], cfg["use_logn_attn"])
    x = ids(length=32)  # the whole training length
    with torch.no_grad():
        expected = oracle(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        # the hand-written Qwen1 agrees with transformers too, so it can judge what Qwen2 cannot
        torch.testing.assert_close(qwen1_reference(w, cfg, x), expected, atol=1e-5, rtol=0)


def test_preset_qwen_7b_reads_back_from_its_config_json():
    from lmzoo.formats import hf_qwen

    c = lmzoo.preset("qwen-7b")
    written = hf_qwen.write_qwen_config(c)
    # Qwen-7B's own config.json says these (its intermediate_size counts w1 and w2).
    assert {k: written[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "kv_channels",
                                    "intermediate_size", "seq_length", "max_position_embeddings",
                                    "vocab_size", "use_dynamic_ntk", "use_logn_attn", "no_bias")} == dict(
        hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, kv_channels=128, intermediate_size=22016,
        seq_length=8192, max_position_embeddings=32768, vocab_size=151936, use_dynamic_ntk=True,
        use_logn_attn=True, no_bias=True)
    assert lmzoo.Config(**hf_qwen.read_qwen_config(written)) == c


# ----------------------------------------------------------------------------- saving
def test_round_trip_writes_the_qwen_format(tmp_path):
    _, path, w, cfg = oracle_checkpoint("ntk-and-logn-on", tmp_path)
    model, _ = lmzoo.load(path)
    out = lmzoo.save_hf_dir(model, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "qwen" and written["architectures"] == ["QWenLMHeadModel"]
    assert written["auto_map"] == {"AutoConfig": "configuration_qwen.QWenConfig",
                                   "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "kv_channels", "intermediate_size",
                "seq_length", "max_position_embeddings", "vocab_size", "use_dynamic_ntk", "use_logn_attn",
                "no_bias", "tie_word_embeddings", "layer_norm_epsilon", "rotary_emb_base", "rotary_pct"):
        assert written[key] == cfg[key], key
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert sorted(saved) == sorted(w)
    for name in w:
        assert torch.equal(saved[name], w[name]), name
    again, _ = lmzoo.load(out)
    assert again.config == model.config
    x = ids(length=32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_round_trip_with_biases_partial_rotary_and_tied_head(tmp_path):
    cfg = qwen1_config(no_bias=False, rotary_pct=0.5, tie_word_embeddings=True, use_dynamic_ntk=False)
    model, _ = lmzoo.load(write_dir(tmp_path / "a", cfg, random_qwen1_weights(cfg)))
    assert (model.config.o_bias, model.config.mlp_bias, model.config.rope_dims) == (True, True, 8)
    lmzoo.save_hf_dir(model, tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (written["no_bias"], written["rotary_pct"], written["tie_word_embeddings"]) == (False, 0.5, True)
    assert "lm_head.weight" not in load_file(str(tmp_path / "b" / "model.safetensors"))
    again, _ = lmzoo.load(tmp_path / "b")
    assert again.config == model.config
    x = ids(length=20)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ----------------------------------------------------------------------------- NTK and logn
def test_inverse_frequencies_follow_qwens_ntk_alpha():
    c, _ = registry.config_from_hf(qwen1_config(), "config.json")
    d = c.rope_dims
    # the step itself, by hand: 1 up to seq_length, then 3 up to 2x, 7 up to 4x, 15 up to 8x
    assert [qwen_ntk_alpha(n, S) for n in (1, S, S + 1, 2 * S, 2 * S + 1, 4 * S, 4 * S + 1, 8 * S)] == \
        [1, 1, 3, 3, 7, 7, 15, 15]
    for n in (1, S - 1, S, S + 1, 2 * S, 2 * S + 1, 3 * S, 4 * S + 1, 37 * S):
        expected = qwen_inv_freq(d, 10000.0, qwen_ntk_alpha(n, S))
        assert torch.equal(inverse_frequencies(c, n), expected), n
    assert torch.equal(inverse_frequencies(c, S), inverse_frequencies(c))  # no change within training
    assert not torch.allclose(inverse_frequencies(c, S + 1), inverse_frequencies(c))


def test_logn_scale_follows_qwens_logn_tensor():
    positions = torch.tensor([[0, 5, S - 2, S - 1, S, S + 1, 3 * S, 1000]])
    got = logn_scale(positions, S).flatten()
    # Qwen's logn_tensor[slot] = log(slot + 1, seq_length) where slot + 1 > seq_length, else 1
    expected = torch.tensor([math.log(p + 1, S) if p + 1 > S else 1.0 for p in positions[0].tolist()])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got[:4].tolist() == [1.0] * 4 and got[4] > 1


def _with(model, **changes):
    other = lmzoo.from_config(model.config.replace(**changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_ntk_and_logn_change_logits_only_past_the_training_length(tmp_path):
    cfg = qwen1_config()
    on, _ = lmzoo.load(write_dir(tmp_path / "q", cfg, random_qwen1_weights(cfg)))
    off = _with(on, rope_scaling=None, logn_attention=False)
    logn_only = _with(on, rope_scaling=None)
    ntk_only = _with(on, logn_attention=False)
    within, past = ids(length=S), ids(length=S + 4)
    with torch.no_grad():
        for model in (on, logn_only, ntk_only):
            assert torch.equal(model(within), off(within))
        base = off(past)
        # logn scales the queries of positions >= seq_length only
        scaled = logn_only(past)
        assert torch.equal(scaled[:, :S], base[:, :S])
        assert (scaled[:, S:] - base[:, S:]).abs().amax(-1).min() > 1e-4
        # NTK turns every rotary frequency but the first, so every position that sees another moves
        turned = ntk_only(past)
        torch.testing.assert_close(turned[:, 0], base[:, 0], atol=1e-6, rtol=0)
        assert (turned[:, 1:] - base[:, 1:]).abs().amax(-1).min() > 1e-5
        assert (on(past) - base).abs().amax() > 1e-3


@pytest.mark.parametrize("fields", [{}, {"rotary_pct": 0.5, "no_bias": False, "tie_word_embeddings": True}],
                         ids=["qwen-7b-like", "biases-partial-rotary-tied"])
@pytest.mark.parametrize("length", [S, S + 3, 2 * S + 5])
def test_one_forward_pass_past_the_training_length_matches_qwen(fields, length, tmp_path):
    cfg = qwen1_config(**fields)
    w = random_qwen1_weights(cfg, seed=3)
    model, _ = lmzoo.load(write_dir(tmp_path / "q", cfg, w))
    x = ids(length=length)
    with torch.no_grad():
        torch.testing.assert_close(model(x), qwen1_reference(w, cfg, x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- cache and batches
@pytest.fixture
def qwen(tmp_path):
    cfg = qwen1_config()
    w = random_qwen1_weights(cfg, seed=5)
    model, _ = lmzoo.load(write_dir(tmp_path / "q", cfg, w))
    return model.eval(), w, cfg


@pytest.mark.parametrize("chunks", [[1] * S, [5, 1, 1, 4, 5], [9, 7]])
def test_cached_decoding_equals_full_forward_within_the_training_length(qwen, chunks):
    model, _, _ = qwen
    x = ids(length=sum(chunks))
    with torch.no_grad():
        full = model(x)
        cache, parts, start = model.new_cache(2, S), [], 0
        for n in chunks:
            parts.append(model(x[:, start:start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def _decode(model, x, prompt_len):
    """Logits of prefilling x[:, :prompt_len], then feeding the rest one token at a time."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    parts = [model(x[:, :prompt_len], cache=cache)]
    for t in range(prompt_len, x.shape[1]):
        parts.append(model(x[:, t:t + 1], cache=cache))
    return torch.cat(parts, 1)


def test_cached_decoding_past_the_training_length_matches_qwen(qwen):
    # a prompt past seq_length, decoding within the same power-of-two step of alpha (S+2 .. 2S)
    model, w, cfg = qwen
    x = ids(length=2 * S)
    with torch.no_grad():
        torch.testing.assert_close(_decode(model, x, S + 2), qwen1_reference(w, cfg, x, alpha_len=S + 2),
                                   atol=1e-5, rtol=0)


def test_decoding_across_an_alpha_step_keeps_the_prefill_alpha(qwen):
    model, w, cfg = qwen
    x = ids(length=S + 6)
    with torch.no_grad():  # the prompt fits the training length, so Qwen decodes with alpha 1 throughout
        torch.testing.assert_close(_decode(model, x, S - 4), qwen1_reference(w, cfg, x, alpha_len=S - 4),
                                   atol=1e-5, rtol=0)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [4, 4, 9, 30, 2, 7]]


def test_left_padded_batch_equals_each_prompt_alone(qwen):
    model, _, _ = qwen
    ids_, mask = left_pad(PROMPTS)
    with torch.no_grad():
        batched = model(ids_, attention_mask=mask)
        for row, p in enumerate(PROMPTS):
            torch.testing.assert_close(batched[row, -len(p):], model(torch.tensor([p]))[0], atol=1e-5, rtol=0)
    out = model.generate(PROMPTS, max_new_tokens=S - 9)  # the longest row ends at seq_length
    for p, got in zip(PROMPTS, out, strict=True):
        assert got == model.generate(torch.tensor([p]), max_new_tokens=S - 9)[0].tolist()
        assert len(got) == len(p) + S - 9


def test_left_padded_batch_past_the_training_length_equals_each_prompt_alone(qwen):
    model, _, _ = qwen
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (S + 2, 2 * S + 3)]
    ids_, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids_, attention_mask=mask)
        for row, p in enumerate(prompts):
            torch.testing.assert_close(batched[row, -len(p):], model(torch.tensor([p]))[0], atol=1e-5, rtol=0)
    for p, got in zip(prompts, model.generate(prompts, max_new_tokens=6), strict=True):
        assert got == model.generate(torch.tensor([p]), max_new_tokens=6)[0].tolist()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field", ["seq_length", "hidden_size", "intermediate_size", "num_hidden_layers"])
def test_config_missing_a_needed_field_is_named(field, tmp_path):
    cfg = qwen1_config()
    w = random_qwen1_weights(cfg)
    del cfg[field]
    with pytest.raises(lmzoo.LmzooError, match=f"lacks the field '{field}'.*'qwen'"):
        lmzoo.load(write_dir(tmp_path / "q", cfg, w))


def test_bad_config_values_and_tensors_are_named(tmp_path):
    cfg = qwen1_config(kv_channels=8)
    with pytest.raises(lmzoo.LmzooError, match="kv_channels=8 must equal"):
        lmzoo.load(write_dir(tmp_path / "a", cfg, random_qwen1_weights(qwen1_config())))
    cfg = qwen1_config()
    w = random_qwen1_weights(cfg)
    del w["transformer.h.1.mlp.w2.weight"]
    with pytest.raises(lmzoo.LmzooError, match=r"missing tensors: transformer\.h\.1\.mlp\.w2\.weight"):
        lmzoo.load(write_dir(tmp_path / "b", cfg, w))
    w = random_qwen1_weights(qwen1_config(intermediate_size=64))  # w1/w2 of width 32, config says 48
    with pytest.raises(lmzoo.LmzooError, match=r"transformer\.h\.0\.mlp\.w1\.weight has shape \[32, 64\]"):
        lmzoo.load(write_dir(tmp_path / "c", cfg, w))


def test_configs_qwen_cannot_say_are_refused_on_save(tmp_path):
    gqa = lmzoo.preset("qwen-7b").replace(vocab_size=97, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                                          max_seq_len=S, max_context=4 * S)
    with pytest.raises(lmzoo.LmzooError, match="no Hugging Face format can express this qwen config"):
        lmzoo.save_hf_dir(lmzoo.from_config(gqa), tmp_path / "gqa")
    assert not (tmp_path / "gqa").exists()


def test_qwen2_sliding_window_on_the_upper_layers_matches_transformers(tmp_path):
    """Qwen2's use_sliding_window: layers from max_window_layers on attend through the window,
    the ones below see everything (sliding_window_from). Logits equal transformers' past the
    window, the config round-trips, and layer 0 really is unwindowed: with every layer windowed
    the logits move by far more than the tolerance."""
    from hf_oracle import assert_round_trip_through_transformers, ids, save, tiny_hf_model

    oracle = tiny_hf_model("qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                           max_window_layers=1)
    ours, _ = lmzoo.load(save(oracle, tmp_path / "ckpt"))
    assert (ours.config.sliding_window, ours.config.sliding_window_from) == (5, 1)
    assert [ours.config.is_window_layer(i) for i in range(2)] == [False, True]
    x = ids(length=24)
    with torch.no_grad():
        expected = oracle(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        every = lmzoo.from_config(ours.config.replace(sliding_window_from=0)).eval()
        every.load_state_dict(ours.state_dict())
        assert (every(x) - expected).abs().max() > 0.1
    assert_round_trip_through_transformers(oracle, tmp_path / "rt", length=24)
    generated = ours.generate([x[0, :10].tolist()], max_new_tokens=8)[0]
    with torch.no_grad():
        seq = x[0, :10].tolist()
        for _ in range(8):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert generated == seq  # the cached decode past the window equals the full forward
