"""Every fast path equals the plain path, within the tolerance stated in each test."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.infer.fuse import fuse_projections
from lmzoo.infer.prepare import PackedLinear, prepare_for_inference
from lmzoo.infer.quant import Int4Linear, Int8Linear, quantize
from lmzoo.nn.head_loss import ChunkedHeadCrossEntropy
from lmzoo.nn.model import RMSNorm


def small(name="smollm2-135m", **kw):
    torch.manual_seed(0)
    c = dataclasses.replace(lmzoo.preset(name), n_layers=2, **kw)
    return lmzoo.Decoder(c).eval()


def plain_loss(model, ids, labels, mask, reduction="mean"):
    labels = labels.clone()
    labels[mask == 0] = -100
    logits = model(ids, attention_mask=mask)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_full_logits_loss(monkeypatch, reduction):
    """Decoder.loss never builds [B, T, vocab]; loss and every gradient match to fp32 rounding (1e-6)."""
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "rows", 16)  # several chunks, and a ragged last one
    model = small()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :10] = -100
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    la = plain_loss(a, ids, labels, mask, reduction)
    lb = b.loss(ids, labels.masked_fill(mask == 0, -100), attention_mask=mask, reduction=reduction)
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        scale = pa.grad.abs().max().item()  # "sum" gradients are ~N times larger than "mean" ones
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6 * max(scale, 1), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_chunked_head_cross_entropy_equals_full_logits(monkeypatch, dtype, head):
    """The loss function itself, in fp32 and in bf16 (whose chunks go through an fp32 buffer and
    back into the bf16 one): the loss and the gradients of autograd through full logits. A
    trainable head goes a chunk of rows at a time; a frozen one (LoRA, P-tuning v2) a slice of
    the vocabulary at a time, rescaling its running sums when a later slice holds a row's
    largest logit (logits of ~+-100 here: without the rescaling, exp would overflow)."""
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "rows", 16)  # several chunks, and a ragged last one
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "frozen_rows", 16)
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "vocab_slice", 64)  # 300 = 4 x 64 + 44
    torch.manual_seed(0)
    h = torch.randn(45, 24).to(dtype).requires_grad_()
    w = (torch.randn(300, 24) * 4).to(dtype).requires_grad_(head == "trainable")
    y = torch.randint(0, 300, (45,))
    inputs = (h, w) if head == "trainable" else (h,)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of each product's output
    ref = F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
    assert F.linear(h, w).abs().max() > 80
    ref_grads = torch.autograd.grad(ref, inputs)
    # scale folds a mean into the function; a gradient other than 1 (a loss / accumulation
    # steps, say) scales the gradients the function accumulated in forward
    for scale, upstream in ((1.0, 1.0), (0.25, 1.0), (1.0, 3.0), (0.25, 3.0)):
        loss = ChunkedHeadCrossEntropy.apply(h, w, y, scale)
        grads = torch.autograd.grad(loss * upstream if upstream != 1 else loss, inputs)
        torch.testing.assert_close(loss, ref * scale, rtol=1e-6, atol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            want = want.float() * scale * upstream
            assert got.dtype == dtype
            assert (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_chunked_head_cross_entropy_of_no_rows_is_zero(head):
    """Every label -100 leaves no rows: the loss and the gradients are zero, not uninitialised."""
    h = torch.randn(0, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=head == "trainable")
    loss = ChunkedHeadCrossEntropy.apply(h, w, torch.zeros(0, dtype=torch.long))
    grads = torch.autograd.grad(loss, (h, w) if head == "trainable" else (h,))
    assert loss.item() == 0 and grads[0].shape == (0, 24) and not any(g.any() for g in grads)


def test_chunked_loss_backward_twice_with_retain_graph():
    """The loss hands its accumulated gradients back as they are (no copy): backward three
    times over a retained graph must still accumulate three times one backward's gradients."""
    model = small().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    once, thrice = copy.deepcopy(model), copy.deepcopy(model)
    once.loss(ids).backward()
    loss = thrice.loss(ids)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    for (name, a), b in zip(once.named_parameters(), thrice.parameters(), strict=True):
        torch.testing.assert_close(b.grad, 3 * a.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_scale_scales_the_loss_and_every_gradient(reduction):
    """Decoder.loss(scale=s), as the training loop calls it: s times the loss and its gradients,
    through the chunked head and through the plain path (a LoRA-wrapped head takes that one)."""
    from lmzoo.peft import LoraConfig, add_lora
    ids = torch.randint(0, 500, (2, 12))
    for lora_head in (False, True):
        model = small(tie_embeddings=not lora_head).train()  # LoRA needs a head of its own
        if lora_head:
            add_lora(model, LoraConfig(r=2, targets=("lm_head",)))
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        la, lb = a.loss(ids, reduction=reduction), b.loss(ids, reduction=reduction, scale=0.3)
        torch.testing.assert_close(lb, 0.3 * la, rtol=1e-6, atol=1e-7)
        la.backward()
        lb.backward()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            if pa.grad is not None:  # the scale enters before fp32 sums in one, after in the other
                want = 0.3 * pa.grad
                assert (pb.grad - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_chunked_loss_with_frozen_head():
    """LoRA-style training (head frozen): only the hidden states get a gradient."""
    model = small()
    for p in model.parameters():
        p.requires_grad_(False)
    model.blocks[0].mlp.down.weight.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    a = copy.deepcopy(model)
    la = plain_loss(a, ids, ids, torch.ones_like(ids))
    lb = model.loss(ids)
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(model.blocks[0].mlp.down.weight.grad, a.blocks[0].mlp.down.weight.grad,
                               rtol=1e-5, atol=1e-7)
    assert model.lm_head.weight.grad is None


def test_rmsnorm_fused_equals_formula():
    """The fp32 fast path (F.rms_norm) equals the written-out formula to 1e-6."""
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_equal_separate(bias):
    """fuse_projections (q|k|v and gate|up as one matrix each) changes logits by < 1e-5."""
    model = small(qkv_bias=bias, mlp_bias=bias)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids)
        fused = fuse_projections(copy.deepcopy(model))
        assert hasattr(fused.blocks[0].attn, "qkv") and hasattr(fused.blocks[0].mlp, "gate_up")
        torch.testing.assert_close(fused(ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 32})])
def test_quantized_linear_equals_its_dequantized_weight(cls, kw):
    """The packed kernels compute x W_q^T + b with bf16 activations: within 2% of the largest output
    of the same product done in fp32 with the dequantized weight (int4's is read back through its
    kernel, whose packed layout is private: so the second check, against the original weight,
    is what proves the 4-bit packing right)."""
    lin = torch.nn.Linear(128, 96, bias=True)
    q = cls(lin, **kw)
    x = torch.randn(2, 7, 128)
    ref = F.linear(x, q.dequantized(), lin.bias)
    out = q(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    # and the quantized weight is close to the original: half a step (int8: 1/254 of the row's
    # largest weight; int4: 1/30 of the group's range, <= 1/15 of the largest), plus bf16 scales
    err = (q.dequantized() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < (0.01 if cls is Int8Linear else 0.08)


def test_int4_cuda_tiles_fit_the_input_width():
    """CUDA's int4 packing tiles the input dimension by 16 * (8, 4 or 2) columns: SmolLM2's 576
    takes 4 (8 made packing fail on a GPU); a width no tile divides is refused by name."""
    from lmzoo.infer.quant import cuda_inner_k_tiles
    assert [cuda_inner_k_tiles(k) for k in (576, 1536, 96, 128, 32)] == [4, 8, 2, 8, 2]
    with pytest.raises(LmzooError, match="in_features=48"):
        cuda_inner_k_tiles(48)


def test_int4_weights_refuse_another_device():
    """The packed int4 layout belongs to the device it was packed on: running it elsewhere is a
    clear error, not garbage."""
    q = Int4Linear(torch.nn.Linear(64, 32), group_size=32)
    with pytest.raises(LmzooError, match="packed on cpu cannot run on meta"):
        q(torch.randn(1, 64, device="meta"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_tracks_fp32(mode):
    """A quantized model's next-token choices agree with fp32 on most positions of a random model
    (whose logits are nearly flat, so this is a harsh check), and generate runs with a cache."""
    model = small()
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = model(ids)
        q = quantize(copy.deepcopy(model), mode)
        out = q(ids)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.05 if mode == "int8" else 0.3)
    assert q.generate(ids, 4).shape == (1, 28)


def test_quantized_cached_decode_equals_its_own_full_forward():
    """The cache fast paths (no mask, no validity check) give the quantized model's own
    full-forward logits, to the bf16 activations' tolerance."""
    model = quantize(small(), "int8")
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 16)
        step = torch.cat([model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache)
                                                            for i in range(6, 10)], dim=1)
    torch.testing.assert_close(step, full, rtol=0.02, atol=0.02)


def test_generate_head_on_last_position_only():
    """generate applies the head only where it needs logits; greedy tokens equal a loop of full
    forwards without a cache (exactly), for a padded batch too."""
    model = small()
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    out = model.generate(prompts, 5)
    for p, o in zip(prompts, out, strict=True):
        seq = list(p)
        with torch.no_grad():
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq


def test_cache_validity_flag_follows_padding():
    """A cache records once, at the prefill, whether padding came in; decoding needs no check."""
    model = small()
    cache = model.new_cache(2, 8)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        model(torch.tensor([[0, 5, 6], [4, 5, 6]]), attention_mask=mask, cache=cache)
    assert cache.all_valid is False
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6], [4, 5, 6]]), attention_mask=torch.ones(2, 3, dtype=torch.long), cache=cache)
    assert cache.all_valid is True


@pytest.mark.skipif(not PackedLinear.supports(torch.nn.Linear(2, 2)), reason="this torch has no oneDNN matmul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_linear(dtype):
    """A PackedLinear computes F.linear with the same weight: fp32 to 1e-5, bf16 to bf16 rounding;
    for one row (decoding) and many (prefill), with a bias, and it keeps the caller's dtype."""
    if dtype == torch.bfloat16 and not PackedLinear.supports(torch.nn.Linear(2, 2, dtype=dtype)):
        pytest.skip("this CPU has no native bf16 matmul")
    lin = torch.nn.Linear(96, 80, bias=True).to(dtype)
    packed = PackedLinear(lin)
    torch.testing.assert_close(packed.unpacked(), lin.weight.detach(), rtol=0, atol=0)
    for rows in (1, 37):
        x = torch.randn(2, rows, 96, dtype=dtype)
        with torch.no_grad():
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(packed(x), lin(x), **tol)


PREPARED_CASES = {  # name: (preset, extra config, adapter)
    "smollm2": ("smollm2-135m", {}, None),
    "qwen2": ("qwen2-7b", {}, None),
    "chatglm3": ("chatglm3-6b", {}, None),
    "gpt2": ("gpt2", {}, None),
    "mixtral-moe": ("mixtral-8x7b", {"n_experts": 4}, None),  # every expert fused and packed
    "ptuning-v2": ("smollm2-135m", {}, "prefix"),  # virtual keys and values through the fused qkv
    "prompt-tuning": ("smollm2-135m", {}, "prompt"),  # virtual input embeddings
}


def packed_linears_expected(c) -> int:
    """The head, and per block: qkv, o, then gate|up and down once per expert (the router stays exact)."""
    return 1 + c.n_layers * (2 + 2 * max(1, c.n_experts))


@pytest.mark.parametrize("case", PREPARED_CASES)
def test_prepared_model_equals_plain(case):
    """prepare_for_inference (fused projections, packed weights) changes fp32 logits by < 1e-4,
    for a prefill and for cached decoding, and greedy generation gives the same tokens: for dense
    and MoE blocks, and with P-tuning v2 and prompt-tuning adapters attached."""
    from lmzoo.peft import PrefixConfig, PromptConfig, add_virtual

    name, extra, adapter = PREPARED_CASES[case]
    model = small(name, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=128, **extra)
    if adapter is not None:
        config = PrefixConfig(n_virtual=4) if adapter == "prefix" else PromptConfig(n_virtual=4, init="random")
        with torch.no_grad():
            for p in add_virtual(model, config).parameters():
                p.normal_(std=0.5)  # a fresh encoder would barely move the logits
        model.eval()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = model(ids)
        fast = prepare_for_inference(copy.deepcopy(model))
        torch.testing.assert_close(fast(ids), ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(fast.generate(ids, 6), model.generate(ids, 6))
    packed = [m for name, m in fast.named_modules() if isinstance(m, PackedLinear) and not name.startswith("virtual")]
    if PackedLinear.supports(torch.nn.Linear(2, 2)):
        assert len(packed) == packed_linears_expected(model.config)
    else:
        assert not packed


@pytest.mark.parametrize("weight_dtype,input_dtype", [(torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)])
def test_packed_linear_takes_another_input_dtype(weight_dtype, input_dtype):
    """An input of another dtype than the packed weight is computed in the weight's dtype and
    handed back in the caller's: what nn.Linear gives on the input cast to the weight's dtype."""
    lin = torch.nn.Linear(96, 80, bias=True).to(weight_dtype)
    if not PackedLinear.supports(lin):
        pytest.skip(f"this CPU cannot pack {weight_dtype} weights for oneDNN")
    packed = PackedLinear(lin)
    x = torch.randn(3, 5, 96).to(input_dtype)
    with torch.no_grad():
        got = packed(x)
        want = lin(x.to(weight_dtype)).to(input_dtype)
    assert got.dtype == input_dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA int4 kernel needs a CUDA GPU; none here")
def test_int4_cuda_packing_and_kernel_equal_the_plain_linear():
    """On CUDA the 4-bit codes are packed two to a byte (high nibble first) and multiplied by
    _weight_int4pack_mm: equal to F.linear with the weight rebuilt from the same codes, scales
    and zeros in fp32, and to the CPU kernel's output for the same layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 96, bias=True)  # 576 = 9 x 64: CUDA's 4-tile path, as SmolLM2's
    n, k, gs = 96, 576, 32
    w = lin.weight.detach().reshape(n, k // gs, gs)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    codes = ((w - lo) / scale).round().clamp(0, 15)
    rebuilt = ((codes - 8) * scale.bfloat16().float() + (lo + 8 * scale).bfloat16().float()).reshape(n, k)
    on_gpu = Int4Linear(copy.deepcopy(lin).cuda(), group_size=gs)
    on_cpu = Int4Linear(lin, group_size=gs)
    x = torch.randn(4, k)
    want = F.linear(x.bfloat16().float(), rebuilt, lin.bias)
    got = on_gpu(x.cuda()).cpu()
    tol = 0.01 * want.abs().max().item()
    assert (got - want).abs().max() <= tol
    assert (got - on_cpu(x)).abs().max() <= tol
    torch.testing.assert_close(on_gpu.dequantized().cpu(), rebuilt, rtol=0, atol=1e-2 * rebuilt.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_equals_sdpa(dtype):
    """The compiled decode step's attention (lmzoo.nn.attention.one_query_attention) equals SDPA over
    heads repeated for grouped queries, with and without a padding mask: fp32 to 1e-5, bf16 to
    its rounding; and it hands back the dtype it was given."""
    from lmzoo.nn.attention import one_query_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 11, 16, generator=g).to(dtype) for _ in range(2))
    padding = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    padding[1, ..., :4] = False  # the second row's first four keys are padding
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for mask in (None, padding):
        expected = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1),
                                                  v.float().repeat_interleave(3, 1), attn_mask=mask)
        out = one_query_attention(q, k, v, mask)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, **tol)


@pytest.mark.parametrize("case", ["causal", "virtual keys and padding"])
def test_attention_by_products_equals_sdpa(case):
    """bf16 training's attention on a CPU (lmzoo.nn.attention.attention_by_products) against fp32
    SDPA over heads repeated for grouped queries: the output and the gradients of q, k and v
    within bf16 rounding; a row whose keys are all hidden comes out finite, not NaN."""
    from lmzoo.nn.attention import attention_by_products

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, 9, 16
    P = 0 if case == "causal" else 3  # P-tuning v2's virtual keys, in front
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, P + T, D, generator=g) for _ in range(2))
    mask = None
    if P:
        text = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(T, P, dtype=torch.bool), text], 1)[None, None].repeat(B, 1, 1, 1)
        mask[1, :, :, P:P + 2] = False  # the second row's first two tokens are padding
    upstream = torch.randn(B, H, T, D, generator=g)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        if dtype == torch.float32:
            a, b, c = leaves
            out = F.scaled_dot_product_attention(a, b.repeat_interleave(3, 1), c.repeat_interleave(3, 1),
                                                 attn_mask=mask, is_causal=not P)
        else:
            out = attention_by_products(*leaves, mask, not P)
            assert out.dtype == torch.bfloat16
        out.backward(upstream.to(dtype))
        grads.append([out.detach().float()] + [t.grad.float() for t in leaves])
    for name, expected, got in zip(("out", "q", "k", "v"), *grads, strict=True):
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 2 ** -6 * scale, name
    if P:
        mask[0, :, 0] = False  # the first query of row 0 sees nothing at all
        assert attention_by_products(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, False).isfinite().all()


