"""Masks equal their definitions (written here independently, with loops), and the model
behaves as a causal or prefix LM accordingly, with and without the KV cache and padding."""

import pytest
import torch

import lmzoo
from lmzoo.nn.generate import left_pad
from lmzoo.nn.masks import build_mask


def reference(T, *, window=None, pattern="dense", block=4, summary=1, prefix=0, valid=None):
    """allowed[i][j] from the definitions in the Sparse Transformer paper and the prefix-LM idea."""
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            ok = j <= i
            if window is not None:
                ok = ok and i - j < window
            if pattern == "banded":
                ok = ok and i - j < block
            if pattern == "strided":
                ok = ok and (i - j < block or (i - j) % block == 0)
            if pattern == "fixed":
                ok = ok and (i // block == j // block or j % block >= block - summary)
            if i < prefix and j < prefix:
                ok = True
            if valid is not None and not valid[j]:
                ok = False
            out[i, j] = ok or i == j
    return out


@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("kw", [{}, {"window": 1}, {"window": 3}, {"pattern": "banded", "block": 3},
                                {"pattern": "strided", "block": 2}, {"pattern": "strided", "block": 4},
                                {"pattern": "fixed", "block": 4, "summary": 1},
                                {"pattern": "fixed", "block": 3, "summary": 2}])
@pytest.mark.parametrize("prefix", [0, 3, 17])
def test_mask_equals_definition(T, kw, prefix):
    prefix = min(prefix, T)
    got = build_mask(torch.arange(T), T, prefix_end=torch.tensor([prefix]), **kw)
    assert torch.equal(got[0, 0], reference(T, prefix=prefix, **kw))


def test_padding_left_and_right_and_decode_rows():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    got = build_mask(torch.arange(6), 6, key_valid=valid)
    for b in range(2):
        assert torch.equal(got[b, 0], reference(6, valid=valid[b]))
    # cached decoding builds only the new query rows, equal to the full mask's last rows
    rows = build_mask(torch.arange(4, 6), 6, key_valid=valid, window=3)
    full = build_mask(torch.arange(6), 6, key_valid=valid, window=3)
    assert torch.equal(rows, full[:, :, 4:])


def test_virtual_tokens_are_visible_to_every_query():
    got = build_mask(torch.arange(4), 4, n_virtual=2)
    assert got.shape[-1] == 6 and bool(got[..., :2].all())
    assert torch.equal(got[0, 0, :, 2:], reference(4))


@pytest.mark.parametrize("kwargs,name", [({"window": 0}, "window"), ({"block": 0}, "block"),
                                         ({"pattern": "fixed", "block": 2, "summary": 3}, "summary")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(lmzoo.LmzooError, match=name):
        build_mask(torch.arange(4), 4, **kwargs)


TINY = dict(vocab_size=53, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
VARIANTS = {
    "llama": lmzoo.preset("classic").replace(**TINY),
    "llama-as-prefix-lm": lmzoo.preset("classic").replace(lm_type="prefix", **TINY),
    "sliding": lmzoo.preset("classic").replace(sliding_window=4, **TINY),
    "strided": lmzoo.preset("classic").replace(attention_pattern="strided", sparse_block=3, **TINY),
    "fixed-all-layers": lmzoo.preset("classic").replace(attention_pattern="fixed", sparse_block=4,
                                                        sparse_summary=1, sparse_layers="all", **TINY),
}


def model(name):
    torch.manual_seed(0)
    return lmzoo.from_config(VARIANTS[name]).eval()


def hidden(m, x, **kw):
    with torch.no_grad():
        return m.hidden_states(x, **kw)


def test_prefix_lm_sees_both_ways_inside_the_prefix_and_causally_after():
    m, P = model("llama"), 6
    x = torch.randint(0, 53, (1, 12))
    base = hidden(m, x, prefix_len=P)
    inside = x.clone()
    inside[0, 4] = (x[0, 4] + 1) % 53
    h = hidden(m, inside, prefix_len=P)
    assert (h[0, :4] - base[0, :4]).abs().max() > 1e-4  # earlier prefix positions see a later prefix token
    after = x.clone()
    after[0, 8] = (x[0, 8] + 1) % 53
    h = hidden(m, after, prefix_len=P)
    torch.testing.assert_close(h[0, :8], base[0, :8], atol=0, rtol=0)  # nothing before it changes
    assert (h[0, 8:] - base[0, 8:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["llama", "sliding", "strided"])
def test_causal_mode_never_looks_ahead(name):
    m = model(name)
    x = torch.randint(0, 53, (1, 14))
    base = hidden(m, x)
    for t in range(14):
        y = x.clone()
        y[0, t] = (x[0, t] + 1) % 53
        torch.testing.assert_close(hidden(m, y)[0, :t], base[0, :t], atol=0, rtol=0)


def test_sparse_patterns_change_the_sparse_layers_only(monkeypatch):
    """GPT-3 alternates dense and sparse layers: with sparse_layers="odd" the middle layer of
    three attends with the strided pattern, and layers 0 and 2 with plain causal attention (what
    each layer's attention call is handed, read as the pattern it allows)."""
    import lmzoo.nn.attention as attention

    dense = model("llama")
    sparse = lmzoo.from_config(VARIANTS["strided"]).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randint(0, 53, (1, 20))
    assert not torch.allclose(hidden(dense, x), hidden(sparse, x))
    sparse.local_attention = False  # the masked path, whose masks this reads (local_attention is tested against it)
    seen = []
    sdpa = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, k, v, mask, is_causal: seen.append((mask, is_causal))
                        or sdpa(q, k, v, mask, is_causal))
    hidden(sparse, x)
    T = x.shape[1]
    allowed = [reference(T) if mask is None and is_causal else mask.reshape(T, T) for mask, is_causal in seen]
    assert len(allowed) == 3
    assert torch.equal(allowed[0], reference(T)) and torch.equal(allowed[2], reference(T))
    assert torch.equal(allowed[1], reference(T, pattern="strided", block=3))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_cached_generation_equals_full_forward(name, padded):
    m = model(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2]] if padded else [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7]]
    outs = m.generate(prompts, max_new_tokens=10)
    for p, out in zip(prompts, outs, strict=True):
        # the plain path: a full forward pass over the whole sequence, every step
        seq = list(p)
        for _ in range(10):
            with torch.no_grad():
                logits = m(torch.tensor([seq]), prefix_len=len(p) if VARIANTS[name].lm_type == "prefix" else None)
            seq.append(int(logits[0, -1].argmax()))
        assert out == seq


def test_prefix_lm_cached_logits_equal_full_forward_with_padding():
    m = model("llama")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4]]
    ids, mask = left_pad(prompts)
    full_ids = torch.cat([ids, torch.randint(0, 53, (2, 5))], 1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
    plen = mask.sum(-1)
    with torch.no_grad():
        full = m(full_ids, attention_mask=full_mask, prefix_len=plen)
        cache = m.new_cache(2, 20)
        parts = [m(ids, attention_mask=mask, prefix_len=plen, cache=cache)]
        pos = plen[:, None].clone()
        for t in range(5):
            parts.append(m(full_ids[:, 8 + t:9 + t], attention_mask=torch.ones(2, 1), position_ids=pos, cache=cache))
            pos += 1
    got = torch.cat(parts, 1)
    real = full_mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=0)


def test_prefix_longer_than_sequence_is_refused():
    with pytest.raises(lmzoo.LmzooError, match="prefix_len"):
        model("llama")(torch.zeros(1, 4, dtype=torch.long), prefix_len=5)


def test_loss_ignores_unlabelled_tokens_and_the_prefix():
    m = model("llama")
    x = torch.randint(0, 53, (1, 10))
    labels = x.clone()
    labels[0, :6] = -100
    with torch.no_grad():
        logits = m(x, prefix_len=6)
        expected = torch.nn.functional.cross_entropy(logits[0, 5:9], x[0, 6:10])
        torch.testing.assert_close(m.loss(x, prefix_len=6), expected)
        torch.testing.assert_close(m.loss(x, labels, prefix_len=6), expected)


def test_a_prefix_lm_trains_with_its_context_ending_where_the_targets_begin():
    m = lmzoo.from_config(VARIANTS["llama-as-prefix-lm"]).eval()
    x = torch.randint(0, 53, (2, 12))
    labels = x.clone()
    labels[0, :7] = -100  # row 0: context of 7 tokens, then targets
    labels[1, :4] = -100  # row 1: context of 4
    with torch.no_grad():
        logits = m(x, prefix_len=torch.tensor([7, 4]))
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        torch.testing.assert_close(m.loss(x, labels), expected, atol=1e-5, rtol=0)
        # and no target leaks into an earlier prediction: changing the last token changes no earlier logit
        y = x.clone()
        y[:, -1] = (x[:, -1] + 1) % 53
        torch.testing.assert_close(m(y, prefix_len=torch.tensor([7, 4]))[:, :-1], logits[:, :-1], atol=0, rtol=0)
