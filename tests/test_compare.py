"""`lmzoo diff`, `lmzoo families` and `lmzoo info`: the differing fields come from real config.json
values, the derived numbers match published figures, and README.md's families table is the
command's output. Only configs are read (no weights), so these tests are fast."""

import json
import pathlib

import pytest
import torch

import lmzoo
from lmzoo import cli
from lmzoo.config import Config
from lmzoo.show.compare import (
    derived,
    differing_fields,
    families_report,
    flops_per_token,
    kv_cache_bytes_per_token,
    load_config,
    parameters,
)
from lmzoo.show.report import info, nearest_preset, parameter_counts

ROOT = pathlib.Path(__file__).resolve().parent.parent

# config.json as published on the hub (the architecture fields; dropout, token ids and dtypes left out):
# meta-llama/Llama-2-7b-hf, Qwen/Qwen2-7B, THUDM/chatglm2-6b, mistralai/Mistral-7B-v0.1.
PUBLISHED = {
    "llama2-7b": dict(model_type="llama", hidden_act="silu", hidden_size=4096, intermediate_size=11008,
                      max_position_embeddings=4096, num_attention_heads=32, num_hidden_layers=32,
                      num_key_value_heads=32, rms_norm_eps=1e-05, rope_scaling=None, tie_word_embeddings=False,
                      vocab_size=32000),
    "qwen2-7b": dict(model_type="qwen2", hidden_act="silu", hidden_size=3584, intermediate_size=18944,
                     max_position_embeddings=131072, max_window_layers=28, num_attention_heads=28,
                     num_hidden_layers=28, num_key_value_heads=4, rms_norm_eps=1e-06, rope_theta=1000000.0,
                     sliding_window=131072, tie_word_embeddings=False, use_sliding_window=False, vocab_size=152064),
    "chatglm2-6b": dict(model_type="chatglm", add_bias_linear=False, add_qkv_bias=True,
                        apply_residual_connection_post_layernorm=False, ffn_hidden_size=13696, hidden_size=4096,
                        kv_channels=128, layernorm_epsilon=1e-05, multi_query_attention=True,
                        multi_query_group_num=2, num_attention_heads=32, num_layers=28, original_rope=True,
                        padded_vocab_size=65024, post_layer_norm=True, rmsnorm=True, seq_length=32768,
                        tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                       max_position_embeddings=32768, num_attention_heads=32, num_hidden_layers=32,
                       num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=4096,
                       tie_word_embeddings=False, vocab_size=32000),
}
SIZES = {"vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"}
# What each model changes relative to Llama-2-7B, read off the configs above.
FROM_LLAMA2 = {
    "qwen2-7b": SIZES | {"n_kv_heads", "norm_eps", "rope_base", "qkv_bias"},
    "chatglm2-6b": {"vocab_size", "n_layers", "d_ff", "max_seq_len", "n_kv_heads", "rope_fraction", "rope_pairing",
                    "qkv_bias", "fused_qkv", "fused_gate_up"},
    "mistral-7b": {"n_kv_heads", "d_ff", "max_seq_len", "sliding_window"},
}


def write_config(folder: pathlib.Path, hf: dict) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    return str(folder)


@pytest.fixture
def published(tmp_path):
    """Directories holding only the published config.json: diff and info never need the weights."""
    return {name: write_config(tmp_path / name, hf) for name, hf in PUBLISHED.items()}


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ============================================================================= field differences
def test_presets_hold_the_published_values(published):
    for name, folder in published.items():
        assert differing_fields([load_config(folder), lmzoo.preset(name)]) == [], name


@pytest.mark.parametrize("other", FROM_LLAMA2)
def test_diff_from_llama2_names_exactly_the_changed_fields(published, other, capsys):
    code, out, _ = run_cli(capsys, "diff", published["llama2-7b"], published[other], "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert {f["name"] for f in report["fields"]} == FROM_LLAMA2[other]
    for f in report["fields"]:
        assert f["doc"] == Config.explain(f["name"]) != ""
    assert set(differing_fields([lmzoo.preset("llama2-7b"), lmzoo.preset(other)])) == FROM_LLAMA2[other]


def test_diff_of_four_models_side_by_side(capsys):
    code, out, _ = run_cli(capsys, "diff", "llama2-7b", "qwen2-7b", "chatglm2-6b", "mistral-7b")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert set(FROM_LLAMA2["qwen2-7b"] | FROM_LLAMA2["chatglm2-6b"] | FROM_LLAMA2["mistral-7b"]) <= set(rows)
    assert rows["qkv_bias"][1:5] == ["False", "True", "True", "False"]
    assert rows["sliding_window"][1:5] == ["-", "-", "-", "4096"]
    assert Config.explain("rope_pairing") in out  # each row carries its field's documentation
    assert rows["total"][2:6] == ["6.74B", "7.62B", "6.24B", "7.24B"]  # "total parameters" row
    assert rows["KV"][5:] == ["512", "KiB", "56", "KiB", "28", "KiB", "128", "KiB"]


def test_diff_markdown_and_fields_that_change_nothing(capsys):
    code, out, _ = run_cli(capsys, "diff", "llama3-8b", "gpt2", "--format", "markdown")
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| rope_base")]
    assert table == ["| rope_base | 500000.0 | n/a | Rotary base theta: frequencies are base^(-2i/d). |"]
    assert "| fused_qkv | False | True | One matrix computes q\\|k\\|v" in out  # '|' escaped in cells
    assert "experts_per_token" not in out  # a dense MLP's top-k is no difference


# ============================================================================= derived numbers
def test_parameter_counts_agree_with_the_module_for_every_preset():
    for name, config in lmzoo.PRESETS.items():
        counted = parameter_counts(lmzoo.from_config(config, device="meta"))["total"]
        assert parameters(config)[0] == counted, name


def test_active_parameters_are_the_ones_a_token_touches():
    """One token through a tiny MoE: the parameters that receive a gradient are the active ones.
    An earlier token sits in the KV cache (no gradient), so q and k matter: over a single key the
    softmax is 1 whatever they are."""
    c = Config(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_ff=24, n_experts=4, experts_per_token=2,
               qkv_bias=True, mlp_bias=True, max_seq_len=8)
    model = lmzoo.from_config(c)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[5]]), cache=cache)
    model(torch.tensor([[3]]), cache=cache).sum().backward()
    touched = sum(p.numel() for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    total, active = parameters(c)
    assert active == touched < total
    assert total == model.num_parameters()


def test_published_parameter_counts():
    # Mixtral-8x7B: "46.7B total parameters but only uses 12.9B parameters per token"
    # (Mistral AI, "Mixtral of experts", 11 December 2023).
    total, active = parameters(lmzoo.preset("mixtral-8x7b"))
    assert total == pytest.approx(46.7e9, rel=0.01)
    assert active == pytest.approx(12.9e9, rel=0.01)
    # GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1.
    assert parameters(lmzoo.preset("gpt3-175b"))[0] == pytest.approx(175.0e9, rel=0.01)
    # ChatGLM2-6B "6.2B" and Qwen-7B "7.7B" (Qwen-VL, Bai et al. 2023, Table 1). The exact counts are
    # model.num_parameters() of the released checkpoints, listed in the calflops README
    # (github.com/MrYxJ/calculate-flops.pytorch): 6243584000, 7721324544, 6738415616 (Llama-2-7B).
    assert parameters(lmzoo.preset("chatglm2-6b"))[0] == pytest.approx(6.2e9, rel=0.01) == 6243584000
    assert parameters(lmzoo.preset("qwen-7b"))[0] == pytest.approx(7.7e9, rel=0.01) == 7721324544
    assert parameters(lmzoo.preset("llama2-7b"))[0] == 6738415616


def test_flops_per_token_match_published_counts():
    # calflops README, batch 1 x 128 tokens, "fwd FLOPs(G)": divided by 128 tokens.
    for name, gflops in (("llama2-7b", 1700.06), ("chatglm2-6b", 1537.68), ("qwen-7b", 1825.83)):
        assert flops_per_token(lmzoo.preset(name), 128) == pytest.approx(gflops * 1e9 / 128, rel=0.01), name
    # GPT-3 175B was trained with 3.14e23 FLOPs on 300B tokens (Brown et al. 2020, Table D.1), counted
    # as 3 x forward (forward + backward) without attention, which the paper leaves out.
    assert 3 * flops_per_token(lmzoo.preset("gpt3-175b"), 1) * 300e9 == pytest.approx(3.14e23, rel=0.01)


def test_sliding_window_and_sparse_layers_cap_the_attention_flops():
    mistral = lmzoo.preset("mistral-7b")
    at_window = flops_per_token(mistral, 4096)
    assert flops_per_token(mistral, 32768) == at_window  # past the window, a token sees 4096 keys
    assert flops_per_token(mistral.replace(sliding_window=None), 32768) > at_window
    gpt3 = lmzoo.preset("gpt3-175b")
    dense = gpt3.replace(attention_pattern="dense")
    # half the layers see 256 keys instead of 2048: q.k and softmax.v are 4 FLOPs per key and head dim
    saved = 48 * (2048 - 256) * 4 * gpt3.n_heads * gpt3.head_size
    assert flops_per_token(dense, 2048) - flops_per_token(gpt3, 2048) == saved


def test_kv_cache_per_token():
    # Llama 2 70B uses grouped-query attention with 8 key/value heads for its 64 query heads
    # (Touvron et al. 2023, "Llama 2", section 2.2 and Table 1): its cache is 8x smaller than with MHA.
    gqa = lmzoo.preset("llama2-70b")
    mha = gqa.replace(n_kv_heads=None)
    assert kv_cache_bytes_per_token(gqa) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_cache_bytes_per_token(mha) / kv_cache_bytes_per_token(gqa) == pytest.approx(8, rel=0.01)
    assert derived(lmzoo.preset("qwen-7b")).max_context == 32768  # dynamic NTK past 8192 trained
    assert derived(lmzoo.preset("qwen-7b")).max_seq_len == 8192


# ============================================================================= lmzoo info
def test_info_names_the_nearest_preset_and_what_differs(tmp_path):
    config = lmzoo.preset("smollm2-135m").replace(rope_base=50000.0)
    fmt = lmzoo.formats.registry.format_that_expresses(config)
    folder = write_config(tmp_path / "m", lmzoo.formats.hf.hf_config_json(config, fmt, torch.float32))
    assert nearest_preset(load_config(folder)) == ("smollm2-135m", ["rope_base"])
    text = info(folder)  # config.json only: no weights in the folder
    assert "Nearest preset: smollm2-135m; this model differs from it in 1 field:" in text
    assert "rope_base  100000.0      50000.0" in text
    assert "total parameters                134,515,008" in text


def test_info_of_the_embedded_gguf_reads_only_its_header(monkeypatch):
    import lmzoo.formats.gguf_file as gguf_file

    def no_tensor_data(*args):
        raise AssertionError("info read a tensor's data")

    monkeypatch.setattr(gguf_file, "_dequantize", no_tensor_data)  # every tensor read goes through it
    text = info(lmzoo.default_model_path())
    assert "Same config as the preset smollm2-135m." in text  # norm_eps stored as float32 is no difference
    assert "KV cache / token (fp16)              23,040" in text


# ============================================================================= bad input
def test_unknown_preset_suggests_close_names(capsys):
    code, _, err = run_cli(capsys, "diff", "llama2-7", "qwen2-7b")
    assert code == 1
    assert err.startswith("lmzoo: error: unknown preset 'llama2-7'. Did you mean llama2-7b")


def test_architecture_lmzoo_cannot_express_names_the_field(published, tmp_path, capsys):
    alternating = ["sliding_attention" if i % 2 else "full_attention" for i in range(28)]
    windows = write_config(tmp_path / "q", {**PUBLISHED["qwen2-7b"], "use_sliding_window": True, "sliding_window": 4096,
                                            "max_window_layers": 2, "layer_types": alternating})
    code, _, err = run_cli(capsys, "diff", published["llama2-7b"], windows)
    assert code == 1
    assert "do not follow max_window_layers=2: lmzoo windows every layer from one index on" in err
    yarn = write_config(tmp_path / "y", {**PUBLISHED["llama2-7b"], "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    assert run_cli(capsys, "diff", "llama2-7b", yarn)[2].strip().endswith(
        "rope_type 'yarn' is not implemented; lmzoo supports default, linear, llama3 and dynamic")


@pytest.mark.parametrize("argv, message", [
    (["diff", "llama2-7b"], "needs at least two models"),
    (["diff", "llama2-7b", "qwen2-7b", "--format", "html"], "--format 'html': choose one of text, markdown, json"),
    (["families", "--format", "csv"], "--format 'csv'"),
    (["diff", "llama2-7b", "no/such/dir"], "no/such/dir: no such file or directory"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


# ============================================================================= lmzoo families
def test_families_has_one_row_per_preset(capsys):
    code, out, _ = run_cli(capsys, "families", "--format", "json")
    rows = {r["preset"]: r for r in json.loads(out)}
    assert code == 0 and list(rows) == list(lmzoo.PRESETS)
    assert rows["mixtral-8x7b"]["active_parameters"] < rows["mixtral-8x7b"]["parameters"]
    assert rows["chatglm2-6b"]["fused"] == ["qkv", "gate_up"] and rows["chatglm-6b"]["lm"] == "prefix"
    assert (rows["qwen2-7b"]["heads"], rows["qwen2-7b"]["kv_heads"]) == (28, 4)
    text = families_report("text").splitlines()
    cells = {line.split()[0]: line for line in text[2:]}
    assert "46.7B (12.9B active)" in cells["mixtral-8x7b"] and "MoE 8× SwiGLU, top-2" in cells["mixtral-8x7b"]
    assert "LayerNorm, post, no final" in cells["gpt1"] and "8K (32K)" in cells["qwen-7b"]
    assert "sliding window 4096" in cells["mistral-7b"]


def test_docs_families_md_is_the_generated_table():
    assert (ROOT / "docs" / "families.md").read_text().strip() == families_report("markdown")


def test_readme_families_table_is_the_generated_table():
    start, end = "<!-- families:start -->", "<!-- families:end -->"
    readme = (ROOT / "README.md").read_text()
    assert readme.count(start) == 1 and readme.count(end) == 1, "README.md needs one start and one end marker"
    table = readme.split(start)[1].split(end)[0]
    assert table.strip() == families_report("markdown"), "regenerate: lmzoo families --format markdown"
