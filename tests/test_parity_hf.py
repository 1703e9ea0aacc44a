"""Every supported HF model_type, loaded through the production loader, matches transformers."""

import dataclasses

import pytest
import torch
from hf_oracle import assert_round_trip_through_transformers, ids, save, tiny_hf_model

import lmzoo
from lmzoo.nn.masks import Visibility

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)),
    "llama3-rope-scaling-tied": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                                               tie_word_embeddings=True)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-attention-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral-window-off": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "mistral-window-on": ("mistral", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "mixtral": ("mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=9)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    oracle = tiny_hf_model(model_type, **overrides)
    ours, _ = lmzoo.load(save(oracle, tmp_path / "ckpt"))
    x = ids(length=40)  # longer than the sliding window and the llama3 original context
    with torch.no_grad():
        expected = oracle(x).logits
        got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("defect", ["rotary position", "window"])
def test_a_one_position_defect_fails_parity_by_a_wide_margin(defect, tmp_path, monkeypatch):
    """The oracle is sharp enough to matter: one position off in rotary (from the middle of the
    sequence on) or a sliding window one token too wide moves the logits by ~1 and ~2.5, five
    orders of magnitude above the parity tolerance (with transformers' 0.02 init: 1.3e-3, 0.14)."""
    import lmzoo.nn.model as model_module

    oracle = tiny_hf_model("mistral", num_key_value_heads=2, sliding_window=7)
    ours, _ = lmzoo.load(save(oracle, tmp_path / "ckpt"))
    rope_tables, visible = model_module.rope_tables, Visibility.__call__

    def shifted_rope(c, positions, **kw):
        positions = positions.clone()
        positions[..., positions.shape[-1] // 2:] += 1
        return rope_tables(c, positions, **kw)

    def wider_window(self, q, k):  # every path reads its masks from Visibility: masked, local and ring
        return visible(dataclasses.replace(self, window=self.window + 1) if self.window else self, q, k)

    if defect == "rotary position":
        monkeypatch.setattr(model_module, "rope_tables", shifted_rope)
    else:
        monkeypatch.setattr(Visibility, "__call__", wider_window)
    x = ids(length=40)
    with torch.no_grad():
        assert (ours(x) - oracle(x).logits).abs().max() > 0.5


@pytest.mark.parametrize("case", ["llama-gqa", "llama3-rope-scaling-tied", "mistral-window-on", "qwen2", "mixtral"])
def test_round_trip_through_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    assert_round_trip_through_transformers(tiny_hf_model(model_type, **overrides), tmp_path, length=30)


def test_sharded_checkpoint_loads(tmp_path):
    oracle = tiny_hf_model("llama", num_key_value_heads=2)
    oracle.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours, _ = lmzoo.load(tmp_path / "sharded")
    x = ids(length=12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), oracle(x).logits, atol=1e-5, rtol=0)
