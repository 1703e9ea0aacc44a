"""Does lmzoo compute the right thing on a CUDA GPU? The CPU test suite's checks, on the device.

    bench/gpu.sh runs it first; or: python bench/gpu_check.py [--model DIR|FILE.gguf] [--check-json PATH]
    .venv/bin/python bench/gpu_check.py --device cpu --quick    # a smoke test of this script

CI has no GPU, so tests/ prove everything on the CPU. This script repeats the checks whose
result could differ on CUDA (other kernels, other packing, flash attention, compiled graphs
through Triton), through the production loader, against transformers on the same weights and
against lmzoo's own plain path. Each check prints one line: PASS or FAIL, its figure and its
limit. Exit status 1 if any check fails. Not in CI.
"""
import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback

import torch

import lmzoo
from bench import DECODE_PROMPT, TEXT, prompt_ids  # bench/bench.py
from lmzoo.infer.prepare import prepare_for_inference
from lmzoo.nn import recompute
from lmzoo.peft import LoraConfig, PrefixConfig, add_lora, add_virtual

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


class Ctx:
    """What the checks share: the fp32 model on the CPU and on the device, and token ids."""

    def __init__(self, source, device, quick):
        from transformers import AutoModelForCausalLM
        self.device, self.quick = device, quick
        self.cpu, self.tok = lmzoo.load(source)  # fp32, through the production loader
        self.cpu.eval()
        self.gpu = lmzoo.load(source, device=device)[0].eval()
        self.hf_dir = source if source and os.path.isdir(source) else \
            lmzoo.save_hf_dir(self.cpu, os.path.join(tempfile.mkdtemp(prefix="lmzoo-gpucheck-"), "hf"), self.tok)
        self.hf = lambda dtype: AutoModelForCausalLM.from_pretrained(
            self.hf_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.text = prompt_ids(self.tok, TEXT, 64 if quick else 256).to(device)
        self.prompt = torch.tensor([self.tok.encode(DECODE_PROMPT)], device=device)
        self.new = 16 if quick else 64

    def fresh(self, dtype=None):
        """A new model on the device, as loaded (for checks that change it)."""
        return copy.deepcopy(self.gpu).to(dtype=dtype) if dtype else copy.deepcopy(self.gpu)


def rel(a, b):
    """max |a - b| over max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def agreement(a, b):
    """Share of positions where the two logits pick the same token."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def greedy(model, ids, n):
    return model.generate(ids, n)[:, ids.shape[1]:].cpu()


# ------------------------------------------------------------------------------- inference
@check
def parity_fp32(c):
    """fp32 logits: lmzoo on the device vs transformers on the device, and vs lmzoo on the CPU."""
    with torch.inference_mode():
        ours = c.gpu(c.text)
        theirs = c.hf(torch.float32)(c.text).logits
        cpu = c.cpu(c.text.cpu())
    a, b = rel(ours, theirs), rel(ours.cpu(), cpu)
    return max(a, b) < 1e-4, f"vs transformers {a:.1e}, vs CPU {b:.1e} (relative; limit 1e-4)"


@check
def parity_bf16(c):
    """bf16 logits (flash attention where SDPA picks it): lmzoo vs transformers, both vs fp32."""
    with torch.inference_mode():
        ref = c.gpu(c.text)
        ours = c.fresh(torch.bfloat16)(c.text)
        theirs = c.hf(torch.bfloat16)(c.text).logits
    a, b, r = agreement(ours, theirs), agreement(ours, ref), rel(ours, theirs)
    return a >= 0.95 and b >= 0.95, f"top-1 vs transformers bf16 {a:.1%}, vs fp32 {b:.1%}; " \
                                    f"max diff {r:.1e} of max |logit| (limit 95%)"


@check
def flash_attention_bf16(c):
    """A causal bf16 forward with SDPA restricted to the flash kernel (it refuses an explicit mask:
    lmzoo passes none for a plain causal model), against SDPA's own choice and fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = c.fresh(torch.bfloat16)
    with torch.inference_mode():
        ref = c.gpu(c.text)
        free = model(c.text)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = model(c.text)
    a, b = agreement(flash, free), agreement(flash, ref)
    return a >= 0.95 and b >= 0.95, f"runs; top-1 vs SDPA's choice {a:.1%}, vs fp32 {b:.1%} (limit 95%)"


@check
def cache_equals_plain(c):
    """Greedy tokens from the KV cache are the argmax of a plain full forward over them."""
    with torch.inference_mode():
        out = c.gpu.generate(c.prompt, c.new)
        logits = c.gpu(out[:, :-1].to(c.device))
    T = c.prompt.shape[1]
    picked = logits[0, T - 1:].argmax(-1).cpu()
    same = (picked == out[0, T:]).float().mean().item()
    return same == 1.0, f"{same:.1%} of {c.new} tokens (limit 100%)"


@check
def greedy_vs_transformers(c):
    """fp32 greedy tokens: lmzoo vs transformers.generate on the device."""
    hf = c.hf(torch.float32)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        ours = greedy(c.gpu, c.prompt, c.new)
        theirs = hf.generate(c.prompt, attention_mask=torch.ones_like(c.prompt), max_new_tokens=c.new,
                             min_new_tokens=c.new, do_sample=False, pad_token_id=0)[:, c.prompt.shape[1]:].cpu()
    same = (ours == theirs).float().mean().item()
    return same == 1.0, f"{same:.1%} of {c.new} tokens equal (limit 100%)"


@check
def batched_equals_single(c):
    """Three prompts of different lengths, left-padded into one batch, decode as if alone."""
    prompts = [c.prompt[0, :n].tolist() for n in (5, 17, c.prompt.shape[1])]
    with torch.inference_mode():
        batch = c.gpu.generate(prompts, c.new // 2)
        alone = [c.gpu.generate([p], c.new // 2)[0] for p in prompts]
    same = sum(b == a for b, a in zip(batch, alone, strict=True))
    return same == len(prompts), f"{same} of {len(prompts)} rows equal (limit all)"


@check
def prepared_equals_plain(c):
    """prepare_for_inference (q|k|v and gate|up fused) changes only the summation order."""
    model = prepare_for_inference(c.fresh())
    with torch.inference_mode():
        r = rel(model(c.text), c.gpu(c.text))
    return r < 1e-4, f"{r:.1e} (relative; limit 1e-4)"


def _quantized_check(c, mode):
    model = prepare_for_inference(c.fresh(), mode)
    cpu = prepare_for_inference(copy.deepcopy(c.cpu), mode)
    ours, theirs = model.blocks[0].mlp.down, cpu.blocks[0].mlp.down  # the device's packing vs the CPU's
    w = rel(ours.dequantized().cpu(), theirs.dequantized())
    with torch.inference_mode():
        logits, ref = model(c.text), c.gpu(c.text)
        on_cpu = cpu(c.text.cpu())
    a, b = agreement(logits, ref), agreement(logits.cpu(), on_cpu)
    return w < 1e-2 and a >= 0.9 and b >= 0.95, \
        f"dequantized weight vs CPU's {w:.1e} (limit 1e-2); top-1 vs fp32 {a:.1%} (limit 90%), " \
        f"vs the CPU's {mode} {b:.1%} (limit 95%)"


@check
def int8_on_device(c):
    """--quantize int8 on the device: the same weights as on the CPU, and near fp32."""
    return _quantized_check(c, "int8")


@check
def int4_on_device(c):
    """--quantize int4 on the device (CUDA's own int4 packing): the same weights as on the CPU."""
    return _quantized_check(c, "int4")


@check
def compiled_equals_eager(c):
    """The compiled decode step (Triton kernels on CUDA) gives the eager step's greedy tokens."""
    eager = prepare_for_inference(c.fresh())
    compiled = prepare_for_inference(c.fresh(), compile=True)
    t = time.perf_counter()
    with torch.inference_mode():
        b = greedy(compiled, c.prompt, c.new)
        s = time.perf_counter() - t
        a = greedy(eager, c.prompt, c.new)
    same = (a == b).float().mean().item()
    return same == 1.0, f"{same:.1%} of {c.new} tokens equal (limit 100%); first call {s:.0f} s"


# -------------------------------------------------------------------------------- training
def _grads(model, ids):
    model.train()
    with torch.enable_grad():
        loss = model.loss(ids)
        loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _training(make):
    def run(c):
        ids = c.text.reshape(2, -1)
        torch.manual_seed(0)
        cpu = make(copy.deepcopy(c.cpu))
        gpu = copy.deepcopy(cpu).to(c.device)
        l_cpu, g_cpu = _grads(cpu, ids.cpu())
        l_gpu, g_gpu = _grads(gpu, ids)
        worst = max(rel(g_gpu[n], g) for n, g in g_cpu.items())
        ok = set(g_cpu) == set(g_gpu) and abs(l_gpu - l_cpu) < 1e-4 * abs(l_cpu) and worst < 1e-3
        return ok, f"loss {l_gpu:.5f} vs CPU {l_cpu:.5f}; worst gradient of {len(g_cpu)}: {worst:.1e} " \
                   "(relative; limit 1e-3)"
    run.__doc__ = f"{make.__doc__}: loss and every gradient equal the CPU's (fp32)"
    return run


def _lora(m):
    """LoRA r=8 on q,k,v,o,gate,up,down"""
    add_lora(m, LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")))
    for name, p in m.named_parameters():  # B starts at zero: give it values, or A's gradients would be zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return m


def _ptuning(m):
    """P-tuning v2, 32 virtual tokens with projection"""
    add_virtual(m, PrefixConfig(n_virtual=32, projection=True))
    return m


def _full(m):
    """Full fine-tuning"""
    return m


train_lora = check(_training(_lora))
train_lora.__name__ = "train_lora"
train_ptuning_v2 = check(_training(_ptuning))
train_ptuning_v2.__name__ = "train_ptuning_v2"
train_full = check(_training(_full))
train_full.__name__ = "train_full"


@check
def recompute_on_device(c):
    """Recomputing norms and MLP activations in backward (lmzoo.nn.recompute) leaves LoRA gradients
    as they are on the device too."""
    torch.manual_seed(0)
    model = _lora(c.fresh())
    ids = c.text.reshape(2, -1)
    _, on = _grads(copy.deepcopy(model), ids)
    recompute.ENABLED = False
    try:
        _, off = _grads(copy.deepcopy(model), ids)
    finally:
        recompute.ENABLED = True
    worst = max(rel(on[n], g) for n, g in off.items())
    return worst < 1e-5, f"worst gradient difference {worst:.1e} (relative; limit 1e-5)"


@check
def bf16_mixed_precision(c):
    """LoRA on bf16 weights (the adapters fp32): the loss and gradients track fp32's."""
    torch.manual_seed(0)
    fp32 = _lora(c.fresh())
    bf16 = copy.deepcopy(fp32)
    for p in bf16.parameters():  # as lmzoo.load(dtype=bf16) + add_lora: frozen weights bf16, adapters fp32
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    ids = c.text.reshape(2, -1)
    l32, g32 = _grads(fp32, ids)
    l16, g16 = _grads(bf16, ids)
    cos = min(torch.nn.functional.cosine_similarity(g16[n].flatten(), g.flatten(), dim=0).item()
              for n, g in g32.items() if g.abs().max() > 0)
    dl = abs(l16 - l32) / l32
    return dl < 0.02 and cos > 0.95, f"loss {l16:.4f} vs fp32 {l32:.4f} ({dl:.2%}, limit 2%); " \
                                     f"lowest gradient cosine {cos:.3f} (limit 0.95)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated check names")
    p.add_argument("--check-json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.json"))
    args, _ = p.parse_known_args(argv)  # bench/gpu.sh hands both scripts its options: the rest are gpu.py's
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_check.py checks a GPU (try --device cpu --quick for a smoke test)")
        return 1
    c = Ctx(args.model, device, args.quick)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; torch {torch.__version__}")
    results, failed = {}, 0
    for fn in CHECKS:
        if args.only and fn.__name__ not in args.only.split(","):
            continue
        t = time.perf_counter()
        try:
            ok, detail = fn(c)
        except Exception as e:  # a check that crashes fails; the rest still run
            ok, detail = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc(limit=4)
        failed += not ok
        results[fn.__name__] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - t, 1)}
        print(f"{'PASS' if ok else 'FAIL'}  {fn.__name__:<24} {detail}", flush=True)
    with open(args.check_json, "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "checks": results}, f, indent=2)
    print(f"{len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
