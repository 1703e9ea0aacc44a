"""The KV cache and batched generation are fast paths: each must equal the plain path."""

import pytest
import torch
from hf_oracle import assert_incremental_equals_full

import lmzoo
from lmzoo.nn.generate import left_pad, sample

CONFIGS = {
    "llama-gqa": lmzoo.preset("classic").replace(vocab_size=101, n_layers=2, d_model=48, n_heads=6, n_kv_heads=2,
                                                  d_ff=80, max_seq_len=96),
    "mistral-window": lmzoo.preset("mistral-7b").replace(vocab_size=101, n_layers=2, d_model=48, n_heads=6,
                                                         n_kv_heads=2, d_ff=80, max_seq_len=96, sliding_window=5),
    "qwen2-bias-tied": lmzoo.preset("qwen2-7b").replace(vocab_size=101, n_layers=2, d_model=48, n_heads=4,
                                                        n_kv_heads=1, d_ff=80, max_seq_len=96, tie_embeddings=True),
}


def model_for(name):
    torch.manual_seed(0)
    return lmzoo.from_config(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 5, 6], [12, 8]])
def test_incremental_decoding_equals_full_forward(name, chunks):
    assert_incremental_equals_full(model_for(name), chunks, vocab=101)


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padded_forward_equals_each_row_alone(name):
    model = model_for(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [4, 4, 9, 30, 2, 7]]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            torch.testing.assert_close(batched[row, -len(p):], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_generation_equals_each_prompt_alone(name):
    model = model_for(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [4, 4, 9, 30, 2, 7]]
    batched = model.generate(prompts, max_new_tokens=12)
    for p, got in zip(prompts, batched, strict=True):
        alone = model.generate(torch.tensor([p]), max_new_tokens=12)[0].tolist()
        assert got == alone
        assert len(got) == len(p) + 12


def test_generation_equals_argmax_of_full_forward():
    model = model_for("llama-gqa")
    x = torch.randint(0, 101, (1, 8))
    out = model.generate(x, max_new_tokens=10)
    with torch.no_grad():
        seq = x
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()


def test_stop_tokens_end_each_row():
    """Rows of one batch stop at their own steps: each ends right after its first stop token,
    the others keep generating exactly as without stop tokens, and a row that never meets one
    runs to max_new_tokens."""
    model = model_for("llama-gqa")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3], [4, 4, 9, 30, 2, 7], [60, 61]]
    free = [out[len(p):] for p, out in zip(prompts, model.generate(prompts, max_new_tokens=10), strict=True)]
    stops = {free[0][1], free[1][5]}  # row 0 stops early, row 1 later (or where these come first)
    firsts = [next((i for i, t in enumerate(row) if t in stops), None) for row in free]
    assert len({f for f in firsts if f is not None}) >= 2, firsts  # the rows do stop at different steps
    assert None in firsts, firsts  # and one row never stops
    out = model.generate(prompts, max_new_tokens=10, stop_tokens=sorted(stops))
    for p, row, first, got in zip(prompts, free, firsts, out, strict=True):
        want = row if first is None else row[:first + 1]
        assert got[len(p):] == want


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    a = sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    b = sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {3, 4}
    p = torch.softmax(logits[0], -1)  # 0.636, 0.234, 0.086, ...
    c = sample(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(2))
    assert set(c.tolist()) == {3, 4} and p[4] < 0.8 < p[4] + p[3]
    assert sample(logits[:1], 0.0).item() == 4
    model = model_for("llama-gqa")
    x = torch.randint(0, 101, (1, 4))
    s1 = model.generate(x, 8, temperature=1.0, seed=7)
    s2 = model.generate(x, 8, temperature=1.0, seed=7)
    assert torch.equal(s1, s2)


def test_temperature_shapes_the_distribution():
    """Sampled frequencies follow softmax(logits / temperature): sharper below 1, flatter above
    (greedy decoding would give the top token every time at both)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(4000, 1)
    for temperature in (0.5, 2.0):
        drawn = sample(logits, temperature, generator=torch.Generator().manual_seed(3))
        frequency = torch.bincount(drawn, minlength=5).float() / len(drawn)
        want = torch.softmax(logits[0] / temperature, -1)  # top token: 0.865 at 0.5, 0.464 at 2.0
        assert (frequency - want).abs().max() < 0.03, (temperature, frequency, want)
    model = model_for("llama-gqa")
    x = torch.randint(0, 101, (1, 4), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(x, 8)
    hot = [model.generate(x, 8, temperature=5.0, seed=seed) for seed in range(3)]
    assert all(not torch.equal(h, greedy) for h in hot)  # at 5.0 nearly uniform over 101 tokens
    assert torch.equal(model.generate(x, 8, temperature=1e-4, seed=0), greedy)  # near 0: the argmax


def test_prompt_longer_than_context_is_refused():
    model = model_for("llama-gqa")
    with pytest.raises(lmzoo.LmzooError, match="longer than the model's context of 96"):
        model.generate(torch.zeros(1, 97, dtype=torch.long), 1)
    with pytest.raises(lmzoo.LmzooError, match="longer than the context of 96"):
        model(torch.zeros(1, 97, dtype=torch.long))
    # generation stops at the context wall instead of overrunning it
    assert model.generate(torch.zeros(1, 90, dtype=torch.long), 50).shape == (1, 96)
