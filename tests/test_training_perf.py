"""The training fast paths equal the plain ones: LoRA's autograd Function against plain autograd
ops, the gated MLP's recomputing backward against autograd's, oneDNN's linear products against
F.linear's, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmzoo.nn.linear as linear_module
from lmzoo.nn.mlp import ACTIVATIONS, Gated
from lmzoo.nn.model import RMSNorm
from lmzoo.peft.lora import LoraConfig, LoRAFunction, LoRALinear


def lora_outputs(layer: LoRALinear, x: torch.Tensor, fast: bool, seed: int = 1):
    """(y, dL/dx, dL/d every trainable parameter) of one forward and backward, fast or plain."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask both ways
    h = layer.dropout(x)
    keys = [name or "all" for name in layer.slices]
    As, Bs = [layer.lora_A[k] for k in keys], [layer.lora_B[k] for k in keys]
    if fast:
        y = LoRAFunction.apply(x, h, layer.weight, layer.bias, layer.scale, list(layer.slices.values()), *As, *Bs)
    else:
        y = layer.plain_forward(x, h, As, Bs)
    torch.manual_seed(2)
    y.backward(torch.randn(y.shape).to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def make_lora(dtype, slices, bias=False, dropout=0.0, train_base=False):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).to(dtype)
    layer = LoRALinear(base, LoraConfig(r=4, alpha=8, dropout=dropout), slices)
    with torch.no_grad():
        for B in layer.lora_B.values():
            B.normal_(std=0.5)  # a fresh B is zero: make the update, and A's gradient, real
    layer.weight.requires_grad_(train_base)
    if bias:
        layer.bias.requires_grad_(train_base)
    return layer


CASES = {  # slices, bias, dropout, base trains too
    "whole": ({"": (0, 40)}, False, 0.0, False),
    "slices of a fused matrix": ({"q": (0, 16), "v": (28, 12)}, True, 0.0, False),
    "dropout": ({"": (0, 40)}, True, 0.3, False),
    "base weight trains too": ({"": (0, 40)}, True, 0.0, True),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_function_equals_plain_autograd_fp32(case):
    """fp32: the same values and gradients to 1e-6 relative (only the summation order differs)."""
    layer = make_lora(torch.float32, *CASES[case])
    x = torch.randn(3, 7, 24)
    fast, plain = lora_outputs(layer, x, True), lora_outputs(layer, x, False)
    assert len(fast) == len(plain) > 3
    for a, b in zip(fast, plain, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("case", ["whole", "slices of a fused matrix"])
def test_lora_function_on_a_bf16_base_with_fp32_adapters(case):
    """A bf16 base keeps fp32 adapters (and fp32 gradients for them); values and gradients are
    within bf16 rounding of plain autograd's (which rounds the update once more)."""
    layer = make_lora(torch.bfloat16, *CASES[case])
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if "lora_" in n)
    x = torch.randn(3, 7, 24).to(torch.bfloat16)
    fast, plain = lora_outputs(layer, x, True), lora_outputs(layer, x, False)
    for a, b in zip(fast, plain, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2 * b.abs().max().item())


def test_lora_layer_uses_the_function_and_plain_ops_under_autocast():
    layer = make_lora(torch.float32, {"": (0, 40)})
    x = torch.randn(2, 5, 24, requires_grad=True)
    assert layer(x).grad_fn.name() == "LoRAFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.grad_fn.name() != "LoRAFunctionBackward" and y.dtype == torch.bfloat16


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_recomputing_backward_equals_autograd(activation, dtype):
    """act(gate) * up, recomputing act(gate) in backward: bit-identical values and gradients."""
    act = ACTIVATIONS[activation]
    torch.manual_seed(0)
    gate = torch.randn(3, 7, 40).to(dtype).requires_grad_()
    up = torch.randn(3, 7, 40).to(dtype).requires_grad_()
    grad = torch.randn(3, 7, 40).to(dtype)
    fast = Gated.apply(gate, up, act)
    fast_grads = torch.autograd.grad(fast, (gate, up), grad)
    plain = act(gate) * up
    plain_grads = torch.autograd.grad(plain, (gate, up), grad)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_function_equals_autograd_of_the_plain_ops(dtype, weight_grad):
    """RMSNorm trains through RMSNormFunction (a hand-written backward that keeps only x and the
    row scale): the output of RMSNorm without gradients exactly (what recompute.py rebuilds), the
    plain ops' output exactly in bf16/fp16 (fp32 takes the fused F.rms_norm: to 1e-6), and their
    gradients to within one rounding of the dtype (in bf16 and fp16 they come out identical)."""
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.randn(64) * 0.3 + 1
    norm = norm.to(dtype)
    norm.weight.requires_grad_(weight_grad)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    dy = torch.randn(3, 5, 64).to(dtype)
    wrt = [x, norm.weight] if weight_grad else [x]
    y = norm(x)
    assert y.grad_fn.name() == "RMSNormFunctionBackward"
    x32 = x.float()
    plain = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    rounding = 1e-6 if dtype == torch.float32 else 0
    torch.testing.assert_close(y, plain, rtol=rounding, atol=rounding)
    with torch.no_grad():
        assert torch.equal(norm(x), y)
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(plain, wrt, dy), strict=True):
        assert got.dtype == want.dtype
        rounding = 1e-6 if dtype == torch.float32 else 2 ** -7
        assert (got.float() - want.float()).abs().max() <= rounding * want.float().abs().max()


def test_gated_saves_only_gate_and_up():
    """What autograd keeps for backward: gate and up, not act(gate) (the point of Gated)."""
    saved = []
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Gated.apply(gate * 1, up * 1, ACTIVATIONS["silu"])
    assert len(saved) == 2


@pytest.mark.parametrize("fused", [False, True])
def test_a_lora_model_trains_with_the_same_gradients_as_plain_autograd(fused, monkeypatch):
    """The whole decoder (LoRA on every linear, sliced on fused q|k|v and gate|up, the gated
    MLP): the loss and every adapter gradient equal plain autograd's to fp32 rounding."""
    import lmzoo
    from lmzoo.peft import add_lora

    def grads():
        torch.manual_seed(0)
        config = lmzoo.preset("smollm2-135m").replace(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                                                      vocab_size=97, init_std=0.3, fused_qkv=fused,
                                                      fused_gate_up=fused)
        model = lmzoo.from_config(config)
        add_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"),
                                   init="gaussian"))
        model.train()
        loss = model.loss(torch.randint(0, 97, (2, 16)))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast_loss, fast = grads()
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: self.plain_forward(
        x, self.dropout(x), [self.lora_A[k or "all"] for k in self.slices],
        [self.lora_B[k or "all"] for k in self.slices]))
    monkeypatch.setattr(Gated, "apply", lambda gate, up, act: act(gate) * up)
    plain_loss, plain = grads()
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-6, atol=0)
    assert fast.keys() == plain.keys() and len(fast) == 2 * 7 * 2
    for n in fast:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-5, atol=1e-6 * plain[n].abs().max().item())


def test_bf16_lora_training_tracks_the_fp32_loss_curve(tmp_path):
    """bf16 mixed precision as `lmzoo finetune --dtype bfloat16 --method lora` runs it: the
    frozen base in bf16, the adapters, their gradients and AdamW's state in fp32. Over 12
    steps its loss stays within 5% of the fp32 run's at every step (the same data, seed and
    initial adapter; measured: within 3% at lr 2e-2), and it falls as fp32's does."""
    import json

    from test_train import RECORDS
    from tiny import smollm_tokenizer, tiny_model

    from lmzoo.train import TrainConfig, finetune

    tok = smollm_tokenizer()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 3))
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        result = finetune(model, tok, str(data), str(tmp_path / str(dtype)),
                          lora=LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")),
                          train=TrainConfig(steps=12, lr=2e-2, batch_size=4, seed=1, progress=False, warmup_steps=2))
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == dtype for n, p in model.named_parameters() if not p.requires_grad)
        curves[dtype] = [m["loss"] for m in result.metrics]
    fp32, bf16 = curves[torch.float32], curves[torch.bfloat16]
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) < 0.05 * a
    assert bf16[-1] < 0.7 * bf16[0] and fp32[-1] < 0.7 * fp32[0]


# ---------------------------------------------------------------- recomputed activations
# lmzoo.nn.recompute: a norm's output and the MLP's hidden activation are rebuilt in backward
# instead of being held from forward. Same ops on the same inputs, so the same bits.

RECOMPUTE_FAMILIES = {  # preset, overrides: RMSNorm + SwiGLU split/fused, LayerNorm + GELU
    "llama": ("smollm2-135m", {}),
    "fused q|k|v and gate|up": ("smollm2-135m", dict(fused_qkv=True, fused_gate_up=True, qkv_bias=True)),
    "gpt2": ("gpt2", {}),
}


def tiny_trainable(family: str, method: str):
    import lmzoo
    from lmzoo.peft import PrefixConfig, add_lora, add_virtual

    preset, overrides = RECOMPUTE_FAMILIES[family]
    torch.manual_seed(0)
    config = lmzoo.preset(preset).replace(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=48, vocab_size=97,
                                          max_seq_len=64, init_std=0.3, **overrides)
    model = lmzoo.from_config(config)
    if method == "lora":
        targets = ("qkv", "o", "gate_up", "down") if config.fused_qkv else ("q", "k", "v", "o", "gate", "up", "down")
        if config.mlp != "swiglu":
            targets = ("q", "k", "v", "o", "up", "down")
        add_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)  # a fresh B is zero: make A's gradient, which reads the input, real
    elif method == "ptuning_v2":
        add_virtual(model, PrefixConfig(n_virtual=4, projection=True))
    return model.train()


def loss_and_gradients(model, ids):
    for p in model.parameters():
        p.grad = None
    loss = model.loss(ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora", "ptuning_v2"])
@pytest.mark.parametrize("family", list(RECOMPUTE_FAMILIES))
def test_recomputed_activations_give_the_same_gradients(family, method, monkeypatch):
    import lmzoo.nn.recompute

    model = tiny_trainable(family, method)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_gradients(model, ids)
    monkeypatch.setattr(lmzoo.nn.recompute, "ENABLED", False)
    plain_loss, plain = loss_and_gradients(model, ids)
    assert grads.keys() == plain.keys() and grads
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], plain[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recomputed_activations_are_not_held_after_forward(method, monkeypatch):
    """The norms' outputs and the MLP's hidden activations are freed once forward is done
    (the linear layers that read them keep recipes), and backward rebuilds each of them once
    for all the layers that read it: a norm's output for q, k, v (and gate, up), the hidden
    activation for down."""
    import weakref

    import lmzoo.nn.recompute

    reads, rebuilt = [], []

    def read(self, real=lmzoo.nn.recompute._Target.read):
        reads.append(1)
        if self.value is None:
            rebuilt.append(1)
        return real(self)

    monkeypatch.setattr(lmzoo.nn.recompute._Target, "read", read)
    model = tiny_trainable("llama", method)
    outputs = []
    for block in model.blocks:
        block.attn_norm.register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))
        block.mlp_norm.register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))
        block.mlp.down.register_forward_pre_hook(lambda m, args: outputs.append(weakref.ref(args[0])))
    loss = model.loss(torch.randint(0, 97, (2, 16)))
    assert len(outputs) == 3 * len(model.blocks)
    assert all(ref() is None for ref in outputs)
    loss.backward()
    assert len(reads) == 6 * len(model.blocks) and len(rebuilt) == 3 * len(model.blocks)


ONEDNN = linear_module.ONEDNN


def linear_outputs(fn, x, weight, bias, wrt):
    y = fn(x, weight, bias)
    torch.manual_seed(3)
    grads = torch.autograd.grad(y, wrt, torch.randn(y.shape, dtype=y.dtype))
    return [y.detach(), *grads]


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN matmul")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_onednn_linear_equals_f_linear(monkeypatch, bias, weight_trains):
    """lmzoo.nn.linear.linear in fp32 on a CPU runs x W^T and g W on oneDNN (each call counted
    here) and gives F.linear's values and gradients to fp32 rounding, frozen weight or not."""
    calls = []
    onednn = linear_module.onednn_linear
    monkeypatch.setattr(linear_module, "onednn_linear", lambda *a: calls.append(a[1].shape) or onednn(*a))
    torch.manual_seed(0)
    x = torch.randn(3, 37, 96, requires_grad=True)
    weight = torch.randn(80, 96, requires_grad=weight_trains)
    b = torch.randn(80, requires_grad=weight_trains) if bias else None
    wrt = [x] + ([weight] + ([b] if bias else []) if weight_trains else [])
    got = linear_outputs(linear_module.linear, x, weight, b, wrt)
    assert calls == [(80, 96), (96, 80)]  # forward with W, the gradient for x with W^T
    want = linear_outputs(F.linear, x, weight, b, wrt)
    assert len(got) == len(want) == 1 + len(wrt)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    with torch.no_grad():  # inference: the same product, without an autograd Function
        y = linear_module.linear(x, weight, b)
    assert y.grad_fn is None and len(calls) == 3
    torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5 * want[0].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_outside_fp32_is_f_linear_itself(monkeypatch, dtype):
    """Anything but fp32 on a CPU (here fp64 and bf16) takes F.linear unchanged: identical bits."""
    monkeypatch.setattr(linear_module, "onednn_linear", lambda *a: pytest.fail("oneDNN was called"))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    weight = torch.randn(16, 24, dtype=dtype, requires_grad=True)
    for a, w in zip(linear_outputs(linear_module.linear, x, weight, None, [x, weight]),
                    linear_outputs(F.linear, x, weight, None, [x, weight]), strict=True):
        assert torch.equal(a, w)
    with pytest.raises(RuntimeError):  # a shape mismatch gets F.linear's own error
        linear_module.linear(torch.randn(2, 23), torch.randn(16, 24))


@pytest.mark.skipif(not ONEDNN, reason="this torch has no oneDNN matmul, so there is no fast pass to compare")
@pytest.mark.parametrize("adapter", ["lora", "full fine-tuning"])
def test_model_training_step_equals_the_mkl_one(monkeypatch, adapter):
    """A whole tiny model's loss and gradients (LoRA adapters or every weight, the head's chunked
    loss, the blocks) with oneDNN's products equal those with F.linear everywhere, to fp32 rounding.
    The fast pass is shown to run on oneDNN (its products counted), the plain one not at all."""
    from tiny import tiny_model

    from lmzoo.nn.head_loss import ChunkedHeadCrossEntropy
    from lmzoo.peft import LoraConfig, add_lora

    def loss_and_grads():
        model = tiny_model(d_model=64, d_ff=128, vocab_size=300)
        if adapter == "lora":
            add_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")))
            for p in model.parameters():
                if p.requires_grad:
                    p.data.normal_(std=0.1)  # a fresh B is zero: make every adapter matter
        loss = model.loss(torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1)))
        params = [p for p in model.parameters() if p.requires_grad]
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    monkeypatch.setattr(ChunkedHeadCrossEntropy, "rows", 7)  # several chunks (full fine-tuning)
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "frozen_rows", 7)  # and blocks and slices (LoRA)
    monkeypatch.setattr(ChunkedHeadCrossEntropy, "vocab_slice", 64)
    calls = []
    onednn = linear_module.onednn_linear
    monkeypatch.setattr(linear_module, "onednn_linear", lambda *a: calls.append(a[1].shape) or onednn(*a))
    fast = loss_and_grads()
    # forward and input gradient of the 7 projections of 2 blocks, at least; the head's too
    assert len(calls) >= 2 * 7 * 2, len(calls)
    on_onednn = len(calls)
    monkeypatch.setattr(linear_module, "ONEDNN", False)
    plain = loss_and_grads()
    assert len(calls) == on_onednn  # the plain pass never touched oneDNN
    assert len(fast) == len(plain) > 20
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
