"""GPT-1, GPT-2 and GPT-3: hub formats against transformers, the KV cache, GPT-3's sparse
attention against an independent loop-by-loop reference, parameter counts and init."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers
from hf_oracle import assert_incremental_equals_full, ids, save
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.cli import main as cli_main
from lmzoo.formats import registry
from lmzoo.nn.generate import left_pad
from lmzoo.show.report import parameter_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GPT = dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128)


def tiny_gpt(model_type: str, **overrides):
    """A random transformers GPT whose norms and biases are random too (they start at 1 and 0).
    Matrices get std 0.15 (not 0.02): pre-activations of order 1, where exact and tanh GELU
    differ visibly, and sharp attention, where a wrong mask does."""
    config = transformers.AutoConfig.for_model(model_type, **{**TINY_GPT, **overrides})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def randomise_vectors(model):
    """lmzoo inits biases to 0 and norm scales to 1; make them random so they are tested."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------- parity with transformers
HF_CASES = {
    "gpt1": ("openai-gpt", "OpenAIGPTLMHeadModel", {}),
    "gpt1-relu": ("openai-gpt", "OpenAIGPTLMHeadModel", dict(afn="relu", layer_norm_epsilon=1e-3)),
    "gpt2": ("gpt2", "GPT2LMHeadModel", {}),
    "gpt2-n-inner-exact-gelu-untied": ("gpt2", "GPT2LMHeadModel",
                                       dict(n_inner=80, activation_function="gelu", tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_equal_transformers(case, tmp_path):
    model_type, arch, overrides = HF_CASES[case]
    oracle = tiny_gpt(model_type, **overrides)
    assert type(oracle).__name__ == arch
    ours, _ = lmzoo.load(save(oracle, tmp_path / "ckpt"))
    assert ours.config.family == ("gpt" if model_type == "openai-gpt" else "gpt2")
    x = ids(length=40)
    with torch.no_grad():
        expected = oracle(x).logits
        got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gpt1", "gpt2"])
def test_bare_names_of_base_model_checkpoints_load_too(case, tmp_path):
    """The hub's original checkpoints name tensors without the "transformer." prefix."""
    model_type, _, overrides = HF_CASES[case]
    oracle = tiny_gpt(model_type, **overrides)
    src = save(oracle, tmp_path / "a")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert all(not k.startswith("transformer.") for k in bare)
    if model_type == "gpt2":  # old GPT-2 files carry the causal-mask buffers; they are not weights
        bare["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
        bare["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(bare, os.path.join(src, "model.safetensors"))
    ours, _ = lmzoo.load(src)
    x = ids(length=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), oracle(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", HF_CASES)
def test_round_trip_through_transformers(case, tmp_path):
    model_type, arch, overrides = HF_CASES[case]
    oracle = tiny_gpt(model_type, **overrides)
    ours, _ = lmzoo.load(save(oracle, tmp_path / "a"))
    lmzoo.save_hf_dir(ours, tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert written["model_type"] == model_type and written["architectures"] == [arch]
    names = load_file(str(tmp_path / "b" / "model.safetensors")).keys()
    assert set(names) == set(load_file(str(tmp_path / "a" / "model.safetensors")).keys())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    assert type(reloaded) is type(oracle)
    x = ids(length=30)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, oracle(x).logits, atol=1e-5, rtol=0)
    again, _ = lmzoo.load(tmp_path / "b")
    assert again.config == ours.config


REAL_SIZES = {
    "gpt1": ("openai-gpt", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25)),
}


@pytest.mark.parametrize("name", REAL_SIZES)
def test_real_sized_config_json_reads_as_the_preset(name, tmp_path):
    """The config.json transformers writes for the real models is read as lmzoo's preset, field for
    field (family, init and all), and the preset writes a config.json that reads back as itself."""
    model_type, fields = REAL_SIZES[name]
    transformers.AutoConfig.for_model(model_type, **fields).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    config, fmt = registry.config_from_hf(hf, "config.json")
    assert config == lmzoo.preset(name)
    assert fmt.model_type == model_type
    assert registry.format_that_expresses(config) is fmt
    assert lmzoo.Config(**fmt.read_config(fmt.write_config(config))) == config


# --------------------------------------------------------------------------- KV cache and generation
GPT3_TINY = lmzoo.preset("gpt3-125m").replace(vocab_size=97, n_layers=3, d_model=32, n_heads=4, d_ff=64,
                                               max_seq_len=64, sparse_block=4, sparse_summary=2)
TINY_CONFIGS = {
    "gpt1": lmzoo.preset("gpt1").replace(vocab_size=97, n_layers=2, d_model=32, n_heads=4, d_ff=128, max_seq_len=64),
    "gpt2": lmzoo.preset("gpt2").replace(vocab_size=97, n_layers=2, d_model=32, n_heads=4, d_ff=128, max_seq_len=64),
    "gpt3-banded": GPT3_TINY,
    "gpt3-strided": GPT3_TINY.replace(attention_pattern="strided", sparse_layers="all"),
    "gpt3-fixed": GPT3_TINY.replace(attention_pattern="fixed", sparse_layers="even"),
}


def tiny_model(name):
    """Random lmzoo model; matrices scaled to std 0.1 so that attention is sharp."""
    torch.manual_seed(0)
    model = randomise_vectors(lmzoo.from_config(TINY_CONFIGS[name]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


@pytest.mark.parametrize("name", TINY_CONFIGS)
@pytest.mark.parametrize("chunks", [[5, 1, 1, 3], [9, 1, 1, 1, 7]])
def test_incremental_decoding_equals_full_forward(name, chunks):
    assert_incremental_equals_full(tiny_model(name), chunks, vocab=97)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 2, 3], [4, 4, 9, 30, 2, 7]]


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_left_padded_forward_equals_each_row_alone(name):
    """Sparse blocks count positions, not cache slots: padding must not shift them."""
    model = tiny_model(name)
    x, mask = left_pad(PROMPTS)
    with torch.no_grad():
        batched = model(x, attention_mask=mask)
        for row, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p]))
            torch.testing.assert_close(batched[row, -len(p):], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_batched_left_padded_generation_equals_each_prompt_alone(name):
    model = tiny_model(name)
    batched = model.generate(PROMPTS, max_new_tokens=10)
    for p, got in zip(PROMPTS, batched, strict=True):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10)[0].tolist()
        assert got == alone
        assert len(got) == len(p) + 10


# --------------------------------------------------------------------------- GPT-3 sparse attention
def allowed(i: int, j: int, pattern: str, stride: int, c: int) -> bool:
    """May query i attend to key j? Child et al. 2019 (Sparse Transformers), section 4.3, with
    stride/block l (the argument `stride`): 'strided' is A1 = {max(0, i-l), ..., i} and
    A2 = {j : (i-j) mod l = 0}; 'fixed' is A1 = {j : floor(j/l) = floor(i/l)} and
    A2 = {j : j mod l in {l-c, ..., l-1}}.
    GPT-3's 'banded' is a local band of the last l positions, the query included."""
    if j > i:
        return False
    if pattern == "dense":
        return True
    if pattern == "banded":
        return j in range(max(0, i - stride + 1), i + 1)
    if pattern == "strided":
        return j in range(max(0, i - stride), i + 1) or (i - j) % stride == 0
    if pattern == "fixed":
        return j // stride == i // stride or j % stride in range(stride - c, stride)
    raise ValueError(pattern)


def reference_gpt3(state, c, tokens, force_dense=False):
    """Pre-norm GPT with learned positions, tied head, one position at a time, in float64."""
    W = {k: v.detach().double() for k, v in state.items()}
    d, H = c.d_model, c.n_heads
    hd = d // H
    T = len(tokens)

    def layer_norm(v, prefix):
        mean = sum(v.tolist()) / d
        var = sum((a - mean) ** 2 for a in v.tolist()) / d
        return (v - mean) / math.sqrt(var + c.norm_eps) * W[prefix + ".weight"] + W[prefix + ".bias"]

    def linear(v, prefix):
        return W[prefix + ".weight"] @ v + W[prefix + ".bias"]

    def gelu_tanh(u):
        return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))

    def sparse_here(layer):
        return {"all": True, "odd": layer % 2 == 1, "even": layer % 2 == 0}[c.sparse_layers]

    x = [W["tok_emb.weight"][t] + W["pos_emb.weight"][p] for p, t in enumerate(tokens)]
    for layer in range(c.n_layers):
        b = f"blocks.{layer}"
        pattern = "dense" if force_dense or not sparse_here(layer) else c.attention_pattern
        qkv = [linear(layer_norm(v, b + ".attn_norm"), b + ".attn.qkv") for v in x]
        q, k, v = [t[:d] for t in qkv], [t[d:2 * d] for t in qkv], [t[2 * d:] for t in qkv]
        attended = []
        for i in range(T):
            heads = []
            for h in range(H):
                s = slice(h * hd, (h + 1) * hd)
                keys = [j for j in range(T) if allowed(i, j, pattern, c.sparse_block, c.sparse_summary)]
                scores = [float(q[i][s] @ k[j][s]) / math.sqrt(hd) for j in keys]
                top = max(scores)
                e = [math.exp(score - top) for score in scores]
                heads.append(sum(w / sum(e) * v[j][s] for w, j in zip(e, keys, strict=True)))
            attended.append(torch.cat(heads))
        x = [x[i] + linear(attended[i], b + ".attn.o") for i in range(T)]
        x = [xi + linear(gelu_tanh(linear(layer_norm(xi, b + ".mlp_norm"), b + ".mlp.up")), b + ".mlp.down")
             for xi in x]
    return torch.stack([W["tok_emb.weight"] @ layer_norm(v, "final_norm") for v in x])


@pytest.mark.parametrize("name", ["gpt3-banded", "gpt3-strided", "gpt3-fixed"])
def test_gpt3_sparse_attention_equals_independent_reference(name):
    c = TINY_CONFIGS[name].replace(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_ff=32)
    torch.manual_seed(3)
    model = randomise_vectors(lmzoo.from_config(c))
    with torch.no_grad():  # larger weights: sharper attention, so a wrong mask shows
        for p in model.parameters():
            p.mul_(4.0)
    tokens = torch.randint(0, 50, (18,)).tolist()
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0].double()
    expected = reference_gpt3(model.state_dict(), c, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # ... and the pattern matters: a dense reference differs (positions past the first block)
    dense = reference_gpt3(model.state_dict(), c, tokens, force_dense=True)
    assert (got - dense)[c.sparse_block + 1:].abs().max() > 1e-2
    torch.testing.assert_close(got[:c.sparse_block], dense[:c.sparse_block], atol=1e-4, rtol=0)


def test_gpt3_has_no_hf_format(tmp_path):
    model = lmzoo.from_config(GPT3_TINY)
    with pytest.raises(lmzoo.LmzooError, match="no Hugging Face format can express this gpt3 config"):
        lmzoo.save_hf_dir(model, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    fmt = registry.FORMATS["gpt2"][0]
    with pytest.raises(lmzoo.LmzooError, match="attention_pattern='banded'"):
        fmt.write_config(GPT3_TINY)


# --------------------------------------------------------------------------- sizes and init
GPT3_PAPER = {"gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-760m": 760e6, "gpt3-1.3b": 1.3e9,
              "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9}


@pytest.mark.parametrize("name", GPT3_PAPER)
def test_gpt3_parameter_counts_match_the_paper(name):
    total = parameter_counts(lmzoo.from_config(lmzoo.preset(name), device="meta"))["total"]
    assert abs(total / GPT3_PAPER[name] - 1) < 0.02, (name, total)


def test_gpt2_small_parameter_count_and_lmzoo_info(capsys):
    counts = parameter_counts(lmzoo.from_config(lmzoo.preset("gpt2"), device="meta"))
    assert counts["total"] == 124_439_808
    assert counts["position embedding"] == 1024 * 768
    assert cli_main(["info", "gpt3-175b"]) == 0
    out = capsys.readouterr().out
    total_line = next(line for line in out.splitlines() if line.strip().startswith("total"))
    total = int(total_line.split()[1].replace(",", ""))
    assert abs(total / 175.0e9 - 1) < 0.02
    assert "attention_pattern" in out and "'banded'" in out


def test_gpt2_scaled_residual_init():
    c = lmzoo.preset("gpt2").replace(vocab_size=97, n_layers=8, d_model=128, n_heads=4, d_ff=512, max_seq_len=32)
    torch.manual_seed(0)
    model = lmzoo.from_config(c)
    scaled = 0.02 / math.sqrt(2 * c.n_layers)
    for block in model.blocks:
        for w, std in ((block.attn.o.weight, scaled), (block.mlp.down.weight, scaled),
                       (block.attn.qkv.weight, 0.02), (block.mlp.up.weight, 0.02)):
            assert abs(w.std().item() / std - 1) < 0.05, (w.shape, w.std().item(), std)
    gpt1 = lmzoo.from_config(c.replace(scaled_residual_init=False))
    assert abs(gpt1.blocks[0].attn.o.weight.std().item() / 0.02 - 1) < 0.05


# --------------------------------------------------------------------------- CLI and bad input
def test_convert_cli_writes_a_directory_transformers_loads(tmp_path):
    oracle = tiny_gpt("gpt2")
    src = save(oracle, tmp_path / "src")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "lmzoo", "convert", src, str(out)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    x = ids(length=16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, oracle(x).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save(tiny_gpt("gpt2"), tmp_path_factory.mktemp("gpt2") / "m")


@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True), ("scale_attn_weights", False),
                                          ("add_cross_attention", True)])
def test_unimplemented_gpt2_options_are_refused(gpt2_dir, tmp_path, field, value):
    with open(os.path.join(gpt2_dir, "config.json")) as f:
        config = json.load(f)
    config[field] = value
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(config, f)
    os.symlink(os.path.join(gpt2_dir, "model.safetensors"), tmp_path / "m" / "model.safetensors")
    with pytest.raises(lmzoo.LmzooError, match=rf"config\.json: {field}={value!r} is not implemented"):
        lmzoo.load(tmp_path / "m")


def test_openai_gpt_unknown_afn_is_refused(tmp_path):
    src = save(tiny_gpt("openai-gpt"), tmp_path / "m")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["afn"] = "mish"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(lmzoo.LmzooError, match="afn 'mish' is not implemented"):
        lmzoo.load(src)
