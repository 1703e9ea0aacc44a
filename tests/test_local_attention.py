"""Sparse attention that is sparse in compute (lmzoo.nn.local_attention) and the rolling cache
(lmzoo.nn.cache) equal the masked dense path, which test_masks checks against the definitions:
every pattern, left padding, a prefix LM, P-tuning v2's virtual tokens, gradients, and cached
decoding far past the window."""

import pytest
import torch

import lmzoo
import lmzoo.nn.local_attention as local
from lmzoo.nn.generate import left_pad
from lmzoo.nn.masks import reach_of
from lmzoo.peft import PrefixConfig, add_virtual

TINY = dict(vocab_size=53, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=256, init_std=0.2)
PATTERNS = {
    "window": dict(sliding_window=5),
    "banded": dict(attention_pattern="banded", sparse_block=4, sparse_layers="all"),
    "banded-odd-layers": dict(attention_pattern="banded", sparse_block=6),
    "strided": dict(attention_pattern="strided", sparse_block=4, sparse_layers="all"),
    "fixed": dict(attention_pattern="fixed", sparse_block=4, sparse_summary=2, sparse_layers="all"),
    "strided-and-window": dict(attention_pattern="strided", sparse_block=3, sliding_window=8, sparse_layers="all"),
    "fixed-within-window": dict(attention_pattern="fixed", sparse_block=8, sparse_summary=1, sliding_window=5),
}
CASES = ["plain", "left-padded", "prefix-lm", "p-tuning-v2"]


def tiny(pattern, case="plain"):
    torch.manual_seed(0)
    lm_type = "prefix" if case == "prefix-lm" else "causal"
    c = lmzoo.preset("classic").replace(**TINY, **PATTERNS[pattern], lm_type=lm_type)
    m = lmzoo.from_config(c)
    if case == "p-tuning-v2":
        add_virtual(m, PrefixConfig(n_virtual=3))
        torch.nn.init.normal_(m.virtual.embedding.weight, std=0.5)
    return m


def batch(case, T=45):
    torch.manual_seed(1)
    x = torch.randint(0, 53, (2, T))
    if case == "plain":
        return x, {}
    ids, mask = left_pad([x[0].tolist(), x[1, : T - 9].tolist()])
    kwargs = {"attention_mask": mask}
    if case == "prefix-lm":
        kwargs["prefix_len"] = torch.tensor([T // 3, 3])
    return ids, kwargs


def both_paths(m, fn):
    """fn() with local attention, then with the masked path; and how many layers took the local path."""
    calls = []
    real = local.local_attention

    def counted(q, k, v, plan):
        calls.append(plan)
        return real(q, k, v, plan)

    local.local_attention = counted
    try:
        m.local_attention = True
        fast = fn()
    finally:
        local.local_attention = real
    m.local_attention = False
    return fast, fn(), len(calls)


def local_layers(m):
    c = m.config
    return sum(reach_of(c, c.is_sparse_layer(i), c.is_window_layer(i))[0] is not None for i in range(c.n_layers))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_local_attention_equals_the_masked_path(pattern, case):
    m = tiny(pattern, case).eval()
    ids, kwargs = batch(case)
    with torch.no_grad():
        fast, masked, calls = both_paths(m, lambda: m(ids, **kwargs))
    assert calls == local_layers(m) > 0  # the local path really ran, on every local layer
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern", ["window", "strided", "fixed"])
@pytest.mark.parametrize("case", ["left-padded", "p-tuning-v2"])
def test_gradients_equal_the_masked_path(pattern, case):
    m = tiny(pattern, case).train()
    ids, kwargs = batch(case)

    def grads():
        m.zero_grad()
        m.loss(ids, **kwargs).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    fast, masked, calls = both_paths(m, grads)
    assert calls and fast.keys() == masked.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], masked[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pattern", ["window", "banded", "strided", "fixed", "fixed-within-window"])
@pytest.mark.parametrize("case", ["left-padded", "prefix-lm", "p-tuning-v2"])
def test_groups_of_one_chunk_equal_the_masked_path_gradients_too(pattern, case, monkeypatch):
    """The middle runs (and backward recomputes) a group of chunks at a time: with one chunk per
    group, every group boundary's keys, far columns and virtual keys still add up exactly."""
    monkeypatch.setattr(local, "GROUP_QUERIES", 1)
    m = tiny(pattern, case).train()
    ids, kwargs = batch(case, T=70)

    def run():
        m.zero_grad()
        logits = m(ids, **kwargs)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (fast, fast_grads), (masked, masked_grads), calls = both_paths(m, run)
    assert calls == local_layers(m) > 0
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=0)
    assert fast_grads.keys() == masked_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], masked_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("defect", ["reach", "tile"])
def test_a_tile_one_key_off_fails_by_a_wide_margin(defect, monkeypatch):
    """The equality above is sharp: tiles one key too short (the band's oldest key missing), or
    keys shifted by one slot against their masks, move the logits by far more than the tolerance."""
    m = tiny("window").eval()
    ids, _ = batch("plain")
    with torch.no_grad():
        m.local_attention = False
        masked = m(ids)
        if defect == "reach":
            plan_for = local.plan_for
            monkeypatch.setattr("lmzoo.nn.model.plan_for", lambda *a, **kw: (
                lambda p: p and local.LocalPlan(**{**p.__dict__, "reach": p.reach - 1}))(plan_for(*a, **kw)))
        else:
            tiles = local._tiles
            monkeypatch.setattr(local, "_tiles", lambda x, *a: tiles(x.roll(1, dims=2), *a))
        m.local_attention = True
        assert (m(ids) - masked).abs().max() > 1e-2


def test_a_pattern_that_covers_the_sequence_takes_the_dense_kernel():
    m = tiny("window").eval()
    with torch.no_grad():
        _, _, calls = both_paths(m, lambda: m(torch.randint(0, 53, (1, 10))))
    assert calls == 0


@pytest.mark.parametrize("pattern", ["window", "banded", "strided", "fixed", "fixed-within-window"])
def test_a_sequence_within_the_reach_takes_sdpas_causal_kernel(pattern):
    """n <= w: the pattern hides nothing causality does not, so no mask is built at all; one token
    more and the pattern's mask (or tiles) come back."""
    c = tiny(pattern).config
    reach = min(r for i in range(c.n_layers) if (r := reach_of(c, c.is_sparse_layer(i), c.is_window_layer(i))[0]))
    m = tiny(pattern)
    assert all(how == (None, True) for how in m._masks(0, reach, None, None, "cpu", 1).values())
    assert any(how != (None, True) for how in m._masks(0, reach + 1, None, None, "cpu", 1).values())


# ---------------------------------------------------------------- the rolling cache

def decode_in_steps(m, ids, kwargs, steps):
    """Prefill ids, then feed more tokens in steps of the given sizes; every step's logits."""
    cache = m.new_cache(ids.shape[0], ids.shape[1] + sum(steps))
    with torch.no_grad():
        parts = [m(ids, cache=cache, **kwargs)]
        more = torch.randint(0, 53, (ids.shape[0], sum(steps)))
        at = 0
        for n in steps:
            parts.append(m(more[:, at:at + n], attention_mask=torch.ones(ids.shape[0], n), cache=cache))
            at += n
    return torch.cat(parts, 1), torch.cat([ids, more], 1), cache


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pattern", ["window", "banded-odd-layers", "fixed-within-window"])
def test_rolling_cache_decodes_past_the_window_like_the_full_forward(pattern, case):
    m = tiny(pattern, case).eval()
    ids, kwargs = batch(case, T=12)
    steps = [1, 1, 3, 1, 7, 1, 1, 2] + [1] * 12
    got, full_ids, cache = decode_in_steps(m, ids, kwargs, steps)
    assert any(cache.ring)  # some layers did roll, and wrapped many times
    assert all(r is None or sum(steps) > 3 * r for r in cache.ring)
    prompt_mask = kwargs.get("attention_mask", torch.ones_like(ids))
    mask = torch.cat([prompt_mask, torch.ones(2, sum(steps), dtype=torch.long)], 1)
    m.local_attention = False
    with torch.no_grad():
        full = m(full_ids, **{**kwargs, "attention_mask": mask})
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)


def test_a_windowed_layer_keeps_a_constant_cache_and_dense_layers_grow():
    m = tiny("banded-odd-layers")  # layer 1 banded (block 6), layers 0 and 2 dense
    sizes = {n: m.new_cache(1, n) for n in (64, 128)}
    ring = [c.k[1].numel() for c in sizes.values()]
    full = [c.k[0].numel() for c in sizes.values()]
    assert ring[0] == ring[1] == 6 * 2 * 8 and full[1] > full[0]
    assert sizes[128].nbytes() < m.new_cache(1, 128, rolling=False).nbytes()


def test_generation_past_the_window_equals_a_full_forward_every_step():
    m = tiny("window").eval()
    prompt = torch.randint(0, 53, (1, 6)).tolist()[0]
    out = m.generate([prompt], max_new_tokens=20)[0]
    seq = list(prompt)
    m.local_attention = False
    for _ in range(20):
        with torch.no_grad():
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq
