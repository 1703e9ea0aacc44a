"""ChatGLM-6B (GLM v1): the chatglm remote-code format against a small independent reference.

No installable oracle runs THUDM's remote code, so `reference_logits` below re-derives the model
from THUDM's modeling_chatglm.py with plain loops, sharing no code with lmzoo: per-head
interleaved q|k|v, 2-D rotary (rotate_half pairs) on the two halves of each head, the prefix-LM
mask (every query sees the context, the rest is causal), DeepNorm residuals with THUDM's
alpha = sqrt(2*28), a tanh-GELU MLP with biases, and the tied head. The position ids follow
THUDM's tokenizer/model for a prompt "... [gMASK] <sop> generated...": the context is every
token before <sop>; positions count 0.. over the context and then stay at the [gMASK] position;
block positions are 0 over the context and 1, 2, ... from <sop> on.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmzoo
import lmzoo.nn.attention as lmzoo_attention
import lmzoo.nn.model as lmzoo_model
from lmzoo.formats import hf_glm1, registry

V, D, H, L, F = 61, 48, 3, 2, 80  # vocab, hidden, heads, layers, inner_hidden_size
HD = D // H  # 16: each 2-D rotary half turns 8 dims, 4 frequencies
GMASK, SOP = 56, 57
EPS = 1e-5
ALPHA = (2 * 28) ** 0.5  # GLMBlock's num_layers=28 default: ChatGLMModel never passes its own depth

CONFIG = {  # the field names of THUDM/chatglm-6b's config.json
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": V, "hidden_size": D,
    "num_layers": L, "num_attention_heads": H, "inner_hidden_size": F, "layernorm_epsilon": EPS,
    "max_sequence_length": 64, "position_encoding_2d": True, "quantization_bit": 0, "pre_seq_len": None,
    "prefix_projection": False, "bos_token_id": SOP, "eos_token_id": 58, "mask_token_id": 55,
    "gmask_token_id": GMASK, "pad_token_id": 3, "use_cache": True, "torch_dtype": "float32",
}
REAL_CHATGLM_6B = {  # THUDM/chatglm-6b's config.json (sizes matter here, weights do not)
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "bos_token_id": 130004, "eos_token_id": 130005,
    "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "hidden_size": 4096,
    "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
    "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True, "pre_seq_len": None,
    "prefix_projection": False, "quantization_bit": 0, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 130528,
}

CONTEXT = [11, 42, 7, 30, 2, 19, 50, GMASK]  # a prompt's context ends with [gMASK]
FULL = CONTEXT + [SOP, 23, 5, 41, 17]  # then <sop> and four generated tokens
SHORT = [9, 33, 21, 4, 48, GMASK, SOP, 12, 40, 6]


# ----------------------------------------------------------------------------- checkpoint
def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.word_embeddings.weight": rnd(V, D, std=0.5)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = 1 + rnd(D, std=0.1)
            sd[p + norm + ".bias"] = rnd(D, std=0.1)
        for name, (rows, cols) in {"attention.query_key_value": (3 * D, D), "attention.dense": (D, D),
                                   "mlp.dense_h_to_4h": (F, D), "mlp.dense_4h_to_h": (D, F)}.items():
            sd[p + name + ".weight"] = rnd(rows, cols, std=0.25)
            sd[p + name + ".bias"] = rnd(rows, std=0.1)
        # THUDM saves this buffer (in the model's dtype) and never loads it back
        sd[p + "attention.rotary_emb.inv_freq"] = (
            1.0 / 10000 ** (torch.arange(0, HD // 2, 2).float() / (HD // 2))).half()
    sd["transformer.final_layernorm.weight"] = 1 + rnd(D, std=0.1)
    sd["transformer.final_layernorm.bias"] = rnd(D, std=0.1)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()  # the tied copy is stored too
    return sd


def write_checkpoint(path, state=None, **config_changes) -> str:
    path.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else random_state(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**CONFIG, **config_changes}))
    return str(path)


STATE = random_state()


@pytest.fixture(scope="module")
def state():
    return STATE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state):
    return write_checkpoint(tmp_path_factory.mktemp("glm1") / "ckpt", state)


@pytest.fixture(scope="module")
def model(ckpt):
    return lmzoo.load(ckpt)[0].eval()


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory, state):
    """A head of its own: with DeepNorm's large alpha a tied head mostly echoes the last token."""
    untied = {**state, "lm_head.weight": torch.randn(V, D, generator=torch.Generator().manual_seed(1))}
    path = write_checkpoint(tmp_path_factory.mktemp("glm1") / "untied", untied, tie_word_embeddings=False)
    return lmzoo.load(path)[0].eval(), untied


# ----------------------------------------------------------------------------- the reference
def thudm_position_ids(tokens: list[int]) -> tuple[list[int], list[int], int]:
    """(positions, block positions, context length) as THUDM's tokenizer builds them."""
    T = len(tokens)
    context = tokens.index(SOP) if SOP in tokens else T
    positions = list(range(T))
    if GMASK in tokens:
        for t in range(context, T):
            positions[t] = tokens.index(GMASK)
    blocks = [0] * context + list(range(1, T - context + 1))
    return positions, blocks, context


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotary(x, positions, fp16_frequencies=True):
    """RoPE with rotate_half pairs (i, i + n/2) over all n dims of x [T, n]."""
    n = x.shape[1]
    positions = torch.tensor(positions, dtype=x.dtype)
    out = x.clone()
    for i in range(n // 2):
        frequency = 1.0 / 10000 ** (2 * i / n)
        if fp16_frequencies:  # THUDM's RotaryEmbedding stores inv_freq as float16
            frequency = float(torch.tensor(frequency).half())
        c, s = torch.cos(positions * frequency), torch.sin(positions * frequency)
        a, b = x[:, i], x[:, i + n // 2]
        out[:, i] = a * c - b * s
        out[:, i + n // 2] = b * c + a * s
    return out


def attention(h, sd, p, positions, blocks, context, fp16_frequencies):
    T = h.shape[0]
    qkv = h @ sd[p + "query_key_value.weight"].T + sd[p + "query_key_value.bias"]
    heads = []
    for head in range(H):
        chunk = qkv[:, head * 3 * HD:(head + 1) * 3 * HD]  # this head's q, k, v side by side
        q, k, v = chunk[:, :HD], chunk[:, HD:2 * HD], chunk[:, 2 * HD:]
        q = torch.cat([rotary(q[:, :HD // 2], positions, fp16_frequencies),
                       rotary(q[:, HD // 2:], blocks, fp16_frequencies)], dim=1)
        k = torch.cat([rotary(k[:, :HD // 2], positions, fp16_frequencies),
                       rotary(k[:, HD // 2:], blocks, fp16_frequencies)], dim=1)
        out = torch.zeros(T, HD, dtype=h.dtype)
        for i in range(T):
            seen = [j for j in range(T) if j <= i or j < context]  # causal, plus the whole context
            scores = torch.stack([q[i] @ k[j] for j in seen]) / math.sqrt(HD)
            probs = torch.softmax(scores, dim=0)
            out[i] = sum(pr * v[j] for pr, j in zip(probs, seen, strict=True))
        heads.append(out)
    return torch.cat(heads, dim=1) @ sd[p + "dense.weight"].T + sd[p + "dense.bias"]


def reference_logits(state, tokens, positions=None, blocks=None, context=None, *, fp16_frequencies=True):
    """Logits [T, V] of one unpadded sequence, in float64."""
    sd = {k: v.double() for k, v in state.items()}
    default_positions, default_blocks, default_context = thudm_position_ids(tokens)
    positions = default_positions if positions is None else positions
    blocks = default_blocks if blocks is None else blocks
    context = default_context if context is None else context
    x = sd["transformer.word_embeddings.weight"][torch.tensor(tokens)]
    for i in range(L):
        p = f"transformer.layers.{i}."
        h = layer_norm(x, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"])
        x = ALPHA * h + attention(h, sd, p + "attention.", positions, blocks, context, fp16_frequencies)
        m = layer_norm(x, sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"])
        up = m @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
        x = ALPHA * m + gelu_tanh(up) @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    x = layer_norm(x, sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"])
    return x @ sd["lm_head.weight"].T


@functools.cache
def expected(tokens: tuple, fp16_frequencies=True):
    """The reference's logits for the module's checkpoint (cached: the loops are slow)."""
    return reference_logits(STATE, list(tokens), fp16_frequencies=fp16_frequencies)


def thudm_ids(tokens):
    """position_ids [2, 1, T] in THUDM's layout, for lmzoo's position_ids argument."""
    positions, blocks, _ = thudm_position_ids(tokens)
    return torch.tensor([[positions], [blocks]])


def close(got, expected):
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- config
def test_real_chatglm_6b_config_reads_as_the_preset():
    config, fmt = registry.config_from_hf(REAL_CHATGLM_6B, "config.json")
    assert fmt is hf_glm1.FORMATS[0]
    assert config == lmzoo.preset("chatglm-6b")


def test_tiny_config_fields(model):
    c = model.config
    assert (c.family, c.vocab_size, c.n_layers, c.d_model, c.n_heads, c.head_size, c.d_ff) == ("glm", V, L, D, H, HD, F)
    assert (c.norm, c.norm_bias, c.norm_position, c.positions, c.rope_fraction, c.rope_pairing, c.lm_type) == \
           ("layernorm", True, "deepnorm", "rope_2d", 0.5, "half", "prefix")
    assert c.residual_scale == pytest.approx(math.sqrt(56))  # not sqrt(2 * num_layers) = 2
    assert c.tie_embeddings and model.lm_head.weight is model.tok_emb.weight


def test_only_glm_v1_configs_match():
    chatglm2 = {"model_type": "chatglm", "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696,
                "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 128, "seq_length": 32768,
                "padded_vocab_size": 65024, "add_qkv_bias": True, "rmsnorm": True}
    assert not hf_glm1.is_glm1(chatglm2)
    assert hf_glm1.is_glm1(CONFIG) and hf_glm1.is_glm1({"inner_hidden_size": 1})


# ----------------------------------------------------------------------------- logits
def test_context_logits_equal_the_reference(model, state):
    want = expected(tuple(CONTEXT))  # no <sop> yet: all of it is context
    with torch.no_grad():
        close(model(torch.tensor([CONTEXT]), prefix_len=len(CONTEXT))[0], want)
    prompt = CONTEXT + [SOP]  # a generation prompt: the default prefix stops before <sop> (span_start_token)
    with torch.no_grad():
        close(model(torch.tensor([prompt]))[0], expected(tuple(prompt)))


def test_generated_part_with_thudm_position_ids_equals_the_reference(model, state):
    _, _, context = thudm_position_ids(FULL)
    want = expected(tuple(FULL))
    with torch.no_grad():
        got = model(torch.tensor([FULL]), prefix_len=context, position_ids=thudm_ids(FULL))[0]
    close(got, want)


def test_the_reference_sees_what_it_claims(state):
    """The reference itself: the context reads both ways, generated tokens only look back."""
    base = expected(tuple(FULL))
    inside = list(FULL)
    inside[5] = 3
    changed = reference_logits(state, inside, *thudm_position_ids(FULL))
    assert (changed[:5] - base[:5]).abs().max() > 1e-3
    later = list(FULL)
    later[10] = 3
    changed = reference_logits(state, later)
    assert torch.equal(changed[:10], base[:10]) and (changed[10:] - base[10:]).abs().max() > 1e-3


def test_default_positions_of_a_generated_part_equal_the_reference(model, state):
    _, _, context = thudm_position_ids(FULL)
    with torch.no_grad():
        got = model(torch.tensor([FULL]), prefix_len=context)[0]
    close(got, expected(tuple(FULL)))


def test_rotary_frequencies_are_rounded_like_thudm(model, state):
    """THUDM stores inv_freq in fp16; rope_fp16_frequencies=True rounds them the same way. The
    rounding moves these logits by ~1e-4 (up to 13x the tolerance) at every position, so each
    setting matches its own reference and not the other's."""
    rounded, unrounded = expected(tuple(FULL), True), expected(tuple(FULL), False)
    assert (rounded - unrounded).abs().amax(-1).min() > 4e-5  # the rounding matters everywhere here
    exact = lmzoo.from_config(model.config.replace(rope_fp16_frequencies=False)).eval()
    exact.load_state_dict(model.state_dict())
    ids, positions = torch.tensor([FULL]), thudm_ids(FULL)
    with torch.no_grad():
        got_rounded = model(ids, prefix_len=8, position_ids=positions)[0]
        got_exact = exact(ids, prefix_len=8, position_ids=positions)[0]
    close(got_rounded, rounded)
    close(got_exact, unrounded)
    assert (got_rounded.double() - unrounded).abs().max() > 4e-5
    assert (got_exact.double() - rounded).abs().max() > 4e-5


# ----------------------------------------------------------------------------- masks and positions
def captured(monkeypatch):
    """Record what the model hands to rotary (position ids) and to SDPA (masks)."""
    seen = {"positions": [], "masks": []}
    rope_tables, sdpa = lmzoo_model.rope_tables, lmzoo_attention.sdpa

    def record_rope(c, positions, **kw):
        seen["positions"].append(positions.clone())
        return rope_tables(c, positions, **kw)

    def record_sdpa(q, k, v, mask, is_causal):
        seen["masks"].append((mask, is_causal))
        return sdpa(q, k, v, mask, is_causal)

    monkeypatch.setattr(lmzoo_model, "rope_tables", record_rope)
    monkeypatch.setattr(lmzoo_attention, "sdpa", record_sdpa)
    return seen


def thudm_mask(tokens):
    T, (_, _, context) = len(tokens), thudm_position_ids(tokens)
    return torch.tensor([[j <= i or j < context for j in range(T)] for i in range(T)])


def padded_batch(rows):
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    contexts = torch.tensor([thudm_position_ids(r)[2] for r in rows])
    return ids, mask, contexts


def test_prefix_mask_is_thudms(model, monkeypatch):
    seen = captured(monkeypatch)
    with torch.no_grad():
        model(torch.tensor([FULL]), prefix_len=thudm_position_ids(FULL)[2])
    mask, is_causal = seen["masks"][0]
    assert not is_causal and len(seen["masks"]) == L
    assert torch.equal(mask[0, 0], thudm_mask(FULL))


def test_masks_and_block_positions_per_row_with_left_padding(model, monkeypatch):
    seen = captured(monkeypatch)
    ids, attention_mask, contexts = padded_batch([SHORT, FULL])
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, prefix_len=contexts)
    positions, (mask, _) = seen["positions"][0], seen["masks"][0]
    assert positions.shape == (2, 2, ids.shape[1])
    for row, tokens in enumerate([SHORT, FULL]):
        real = attention_mask[row].bool()
        thudm_positions, thudm_blocks, context = thudm_position_ids(tokens)
        assert positions[1, row][real].tolist() == thudm_blocks  # 0 over the context, then 1, 2, ...
        assert positions[0, row][real][:context].tolist() == thudm_positions[:context]  # 0.. over the context
        assert torch.equal(mask[row, 0][real][:, real], thudm_mask(tokens))
        assert not mask[row, 0][real][:, ~real].any()  # padding is never seen


def test_default_positions_of_the_generated_part_stay_at_the_mask(model, monkeypatch):
    seen = captured(monkeypatch)
    ids, attention_mask, contexts = padded_batch([SHORT, FULL])
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, prefix_len=contexts)
    for row, tokens in enumerate([SHORT, FULL]):
        real = attention_mask[row].bool()
        assert seen["positions"][0][0, row][real].tolist() == thudm_position_ids(tokens)[0]


def test_left_padded_batch_equals_each_row_alone(model, state):
    ids, attention_mask, contexts = padded_batch([SHORT, FULL])
    with torch.no_grad():
        batch = model(ids, attention_mask=attention_mask, prefix_len=contexts)
        for row, tokens in enumerate([SHORT, FULL]):
            real = attention_mask[row].bool()
            alone = model(torch.tensor([tokens]), prefix_len=int(contexts[row]))[0]
            close(batch[row][real], alone)
        # and with THUDM's own position ids (padded on the left with 0, as its tokenizer does)
        thudm = torch.zeros(2, 2, ids.shape[1], dtype=torch.long)
        for row, tokens in enumerate([SHORT, FULL]):
            thudm[:, row, ids.shape[1] - len(tokens):] = thudm_ids(tokens)[:, 0]
        batch = model(ids, attention_mask=attention_mask, prefix_len=contexts, position_ids=thudm)
    for row, tokens in enumerate([SHORT, FULL]):
        close(batch[row][attention_mask[row].bool()], expected(tuple(tokens)))


# ----------------------------------------------------------------------------- cache and generation
def test_cached_decoding_with_thudm_positions_equals_the_reference(model, state):
    _, _, context = thudm_position_ids(FULL)
    position_ids = thudm_ids(FULL)
    cache = model.new_cache(1, len(FULL))
    with torch.no_grad():
        steps = [model(torch.tensor([FULL[:context]]), prefix_len=context, cache=cache,
                       position_ids=position_ids[:, :, :context])]
        for t in range(context, len(FULL)):
            steps.append(model(torch.tensor([FULL[t:t + 1]]), cache=cache, position_ids=position_ids[:, :, t:t + 1]))
    close(torch.cat(steps, 1)[0], expected(tuple(FULL)))


def test_cached_decoding_equals_the_full_forward(model):
    _, _, context = thudm_position_ids(FULL)
    cache = model.new_cache(1, len(FULL))
    with torch.no_grad():
        full = model(torch.tensor([FULL]), prefix_len=context)
        steps = [model(torch.tensor([FULL[:context]]), prefix_len=context, cache=cache)]
        for t in range(context, len(FULL)):
            steps.append(model(torch.tensor([FULL[t:t + 1]]), cache=cache))
    assert cache.prefix_len.tolist() == [context]
    close(torch.cat(steps, 1), full)


def test_untied_head_is_read(untied_model):
    model, untied = untied_model
    assert not model.config.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight
    with torch.no_grad():
        got = model(torch.tensor([FULL]), prefix_len=8, position_ids=thudm_ids(FULL))[0]
    close(got, reference_logits(untied, FULL))


def test_batched_left_padded_generation_equals_each_prompt_alone(untied_model):
    model, _ = untied_model
    prompts = [CONTEXT + [SOP], [9, 33, GMASK, SOP], [4, 27, 13, 8, 44, GMASK, SOP]]
    contexts = torch.tensor([len(p) - 1 for p in prompts])  # <sop> starts the generated block
    together = model.generate(prompts, 6, prefix_len=contexts)
    alone = [model.generate([p], 6, prefix_len=len(p) - 1)[0] for p in prompts]
    assert together == alone
    assert all(len(out) == len(p) + 6 for out, p in zip(together, prompts, strict=True))
    assert len({tuple(out[len(p):]) for out, p in zip(together, prompts, strict=True)}) > 1  # rows really differ


# ----------------------------------------------------------------------------- saving
def test_save_writes_the_chatglm_format_and_reloads_identically(model, state, tmp_path):
    out = lmzoo.save_hf_dir(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["architectures"] == ["ChatGLMModel"]
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
                "layernorm_epsilon", "max_sequence_length", "position_encoding_2d", "quantization_bit",
                "pre_seq_len"):
        assert config[key] == CONFIG[key], key
    assert config["auto_map"]["AutoModel"].endswith("modeling_chatglm.ChatGLMForConditionalGeneration")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    expected = {k: v for k, v in state.items() if not k.endswith("inv_freq") and k != "lm_head.weight"}
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():  # per-head interleaved q|k|v restored, everything bit-exact
        assert torch.equal(saved[name], tensor), name
    again = lmzoo.load(out)[0].eval()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([FULL]), prefix_len=8), model(torch.tensor([FULL]), prefix_len=8))


def test_qkv_regrouping_is_per_head():
    c = lmzoo.preset("chatglm-6b").replace(d_model=8, n_heads=2, d_ff=8, n_layers=1, vocab_size=5)
    theirs = torch.arange(3 * 8)  # rows: head 0 q(0-3) k(4-7) v(8-11), head 1 q(12-15) k(16-19) v(20-23)
    ours = hf_glm1.per_head_qkv_to_ours(theirs, c)
    assert ours.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 16, 17, 18, 19, 8, 9, 10, 11, 20, 21, 22, 23]
    assert torch.equal(hf_glm1.per_head_qkv_to_theirs(ours, c), theirs)


def test_the_preset_saves_in_this_format(tmp_path):
    c = lmzoo.preset("chatglm-6b").replace(d_model=32, n_heads=2, d_ff=40, n_layers=2, vocab_size=17)
    torch.manual_seed(0)
    m = lmzoo.from_config(c).eval()
    lmzoo.save_hf_dir(m, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_layers"] == 2
    again = lmzoo.load(tmp_path / "p")[0].eval()
    assert again.config == c
    x = torch.tensor([[1, 5, 9, 2, 16, 3]])
    with torch.no_grad():
        assert torch.equal(again(x, prefix_len=4), m(x, prefix_len=4))


def test_a_residual_scale_other_than_thudms_cannot_be_saved(tmp_path):
    c = lmzoo.preset("chatglm-6b").replace(d_model=32, n_heads=2, d_ff=32, n_layers=2, vocab_size=17,
                                           residual_scale=2.0)
    with pytest.raises(lmzoo.LmzooError, match="express"):
        lmzoo.save_hf_dir(lmzoo.from_config(c), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field,value", [("quantization_bit", 4), ("position_encoding_2d", False),
                                         ("pre_seq_len", 16)])
def test_config_values_lmzoo_cannot_run_are_refused(tmp_path, field, value):
    path = write_checkpoint(tmp_path / "bad", **{field: value})
    with pytest.raises(lmzoo.LmzooError, match=rf"config\.json: {field}={value!r}"):
        lmzoo.load(path)


def test_head_width_that_2d_rotary_cannot_split_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "bad", num_attention_heads=5)  # 48 / 5 is no whole head
    with pytest.raises(lmzoo.LmzooError, match="num_attention_heads=5"):
        lmzoo.load(path)


def test_missing_field_is_named(tmp_path):
    config = dict(CONFIG)
    del config["inner_hidden_size"]  # position_encoding_2d still says GLM v1
    path = write_checkpoint(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(lmzoo.LmzooError, match="inner_hidden_size"):
        lmzoo.load(path)


def test_wrongly_shaped_qkv_is_named(tmp_path, state):
    bad = dict(state)
    bad["transformer.layers.1.attention.query_key_value.weight"] = bad[
        "transformer.layers.1.attention.query_key_value.weight"][:-3]
    path = write_checkpoint(tmp_path / "bad", bad)
    with pytest.raises(lmzoo.LmzooError, match="query_key_value"):
        lmzoo.load(path)
