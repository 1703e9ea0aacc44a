"""The compiled decode step (lmzoo.infer.compiled): built once per model layout, kept on disk,
equal to the eager step, and never loaded when stale or damaged."""

import copy
import glob
import os
import subprocess
import sys
import time

import pytest
import torch

import lmzoo
from lmzoo.infer import compiled as compiled_module
from lmzoo.infer.prepare import prepare_for_inference
from lmzoo.nn.generate import left_pad

TINY = dict(vocab_size=61, n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=64, max_seq_len=64)


def tiny(name, **kw):
    torch.manual_seed(0)
    model = lmzoo.from_config(lmzoo.preset(name).replace(**{**TINY, **kw})).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def small():
    """The embedded model's shapes (576 wide, 9/3 heads, a 49k vocabulary) in 2 layers."""
    torch.manual_seed(0)
    return lmzoo.Decoder(lmzoo.preset("smollm2-135m").replace(n_layers=2)).eval()


def artifacts() -> list[str]:
    return sorted(glob.glob(os.path.join(os.environ["LMZOO_CACHE_DIR"], "compiled", "*.pt2")))


def compiled_matches_eager(model, quantize=None, *, batch=False, positions=False, new_tokens=8):
    """Prepare `model` twice, eager and compiled, and check every decode step's logits (fp32: to 1e-4;
    bf16 kernels: to two bf16 steps of the largest logit), the greedy tokens, and the caches the two
    leave behind, for one prompt or a left-padded batch; positions=True passes position_ids as
    lmzoo.serve does. Returns the compiled model, whose steps must all have run compiled."""
    eager = prepare_for_inference(copy.deepcopy(model), quantize)
    compiled = prepare_for_inference(copy.deepcopy(model), quantize, compile=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 4)]
    ids, mask = left_pad(prompts) if batch else (torch.tensor(prompts[:1]), None)
    fp32 = quantize is None and model.tok_emb.weight.dtype == torch.float32
    with torch.inference_mode():  # as in lmzoo.nn.generate
        caches = [m.new_cache(ids.shape[0], ids.shape[1] + new_tokens) for m in (eager, compiled)]
        tokens = [m.lm_head(m.hidden_states(ids, attention_mask=mask, cache=c)[:, -1]).argmax(-1)
                  for m, c in zip((eager, compiled), caches, strict=True)]
        for _ in range(new_tokens - 1):
            assert torch.equal(tokens[0], tokens[1])
            pos = caches[0].key_valid[:, :caches[0].length].sum(-1, keepdim=True) if positions else None
            a = eager(tokens[0][:, None], cache=caches[0], position_ids=pos)
            b = compiled.decode_step(tokens[1][:, None], caches[1], pos)
            tol = 1e-4 if fp32 else 2 ** -6 * a.abs().max().item()
            assert (b - a).abs().max() <= tol, f"{quantize or 'fp32'}: {(b - a).abs().max():.3g} > {tol:.3g}"
            tokens = [a[:, -1].argmax(-1), b[:, -1].argmax(-1)]
    assert compiled.decode_step.compiled_calls == new_tokens - 1, compiled.decode_step.failed
    first, second = caches
    assert first.length == second.length
    for x, y in zip([*first.k, *first.v, first.key_valid, *first.ring_slots.values()],
                    [*second.k, *second.v, second.key_valid, *second.ring_slots.values()], strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-4 if fp32 else 0.1), "the caches differ"
    if not positions:
        rows = prompts if batch else prompts[:1]
        assert compiled.generate(rows, 6) == eager.generate(rows, 6)  # through lmzoo.nn.generate
    return compiled


def test_compiled_step_equals_eager_for_one_row_a_padded_batch_and_served_rows():
    """fp32: one prompt, and a left-padded batch whose rows get their positions as lmzoo.serve gives
    them; then int4 weights. Each is a graph of its own, in one process."""
    model = small()
    compiled_matches_eager(model)
    compiled_matches_eager(model, batch=True, positions=True)  # padding masked inside the graph too
    compiled_matches_eager(model, "int4")


@pytest.mark.parametrize("name, extra", [
    ("qwen-7b", {}),  # fused q|k|v with biases, NTK-aware rotary and logn attention
    ("mistral-7b", {"sliding_window": 5}),  # rolling buffers: the window is passed while decoding
    ("chatglm-6b", {"n_kv_heads": None}),  # GLM's prefix LM: 2-D positions, a bidirectional prompt
    ("gpt2", {"n_kv_heads": None}),  # learned positions, GELU, LayerNorm
    ("gpt3-125m", {"n_kv_heads": None, "sparse_block": 3}),  # GPT-3's sparse layers between dense ones
])
def test_compiled_step_equals_eager_across_families(name, extra):
    compiled_matches_eager(tiny(name, **extra), new_tokens=10)


def test_compiled_step_with_virtual_tokens_and_moe_routing():
    """P-tuning v2's virtual keys sit at the front of the cache. MoE routing is data-dependent: the
    traced step runs every expert over the rows that chose it (none, for most of them)."""
    from lmzoo.peft import PrefixConfig, add_virtual

    prefixed = tiny("classic")
    add_virtual(prefixed, PrefixConfig(n_virtual=4))
    compiled_matches_eager(prefixed)
    compiled_matches_eager(tiny("mixtral-8x7b", n_experts=4), batch=True)


def _generate_in_a_new_process(cache_dir):
    """A tiny model's generate with a compiled step, in a fresh process that also checks its tokens
    against eager: (tokens printed, stderr)."""
    script = ("import sys, torch, lmzoo\n"
              "from lmzoo.infer.prepare import prepare_for_inference\n"
              "torch.manual_seed(0)\n"
              "c = lmzoo.preset('smollm2-135m').replace(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,"
              " vocab_size=300)\n"
              "model = lmzoo.Decoder(c).eval()\n"
              "eager = prepare_for_inference(__import__('copy').deepcopy(model))\n"
              "compiled = prepare_for_inference(model, compile=True)\n"
              "out = compiled.generate([[3, 4, 5, 6, 7]], 12)\n"
              "assert out == eager.generate([[3, 4, 5, 6, 7]], 12), 'compiled tokens differ from eager'\n"
              "assert compiled.decode_step.compiled_calls == 11, compiled.decode_step.failed\n"
              "print(out)\n")
    env = {**os.environ, "LMZOO_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


def test_artifact_round_trip_in_a_new_process(tmp_path):
    """Compiled and kept by one process; a second one loads it (no compile) and decodes the same
    tokens as eager. A truncated file is detected and rebuilt, and so is one built for another model
    (its stored key differs from its name's); neither is ever run."""
    tokens, err = _generate_in_a_new_process(tmp_path)
    assert "compiling the decode step once" in err
    [path] = glob.glob(str(tmp_path / "compiled" / "*.pt2"))
    built = os.path.getmtime(path)

    again, err = _generate_in_a_new_process(tmp_path)
    assert again == tokens and "compiling" not in err and os.path.getmtime(path) == built, err

    with open(path, "r+b") as f:  # a crash mid-copy, a full disk
        f.truncate(os.path.getsize(path) // 2)
    again, err = _generate_in_a_new_process(tmp_path)
    assert again == tokens
    assert f"{path}: not a usable compiled step" in err and "compiling the decode step once" in err
    assert os.path.getsize(path) > 0 and os.path.getmtime(path) > built


def test_an_artifact_built_for_something_else_is_rejected_and_rebuilt(tmp_path, capfd, monkeypatch):
    """Another torch or CPU gives the same model another file name; a file built elsewhere but found
    under that name (copied, say) holds the other key: it is refused before its library is loaded,
    removed, and built again."""
    import shutil

    monkeypatch.setenv("LMZOO_CACHE_DIR", str(tmp_path))
    model = tiny("classic")
    step = compiled_matches_eager(model).decode_step
    [key] = step.steps
    built_here, _ = step.artifact(key)
    monkeypatch.setattr(compiled_module, "_MACHINE", ["another torch, or another CPU"])
    elsewhere, _ = prepare_for_inference(copy.deepcopy(model), compile=True).decode_step.artifact(key)
    assert elsewhere != built_here
    shutil.copy(built_here, elsewhere)
    capfd.readouterr()
    compiled = compiled_matches_eager(model)
    err = capfd.readouterr().err
    assert f"{elsewhere}: not a usable compiled step (built for another model, torch or CPU)" in err
    assert compiled.decode_step.compiled_calls > 0


def test_a_failed_compile_decodes_eagerly_with_one_line(monkeypatch, capfd):
    """No C++ compiler, say: one line says why, and the answer is the eager one (finished work is
    never turned into a failure by an optional speed-up)."""
    import torch._inductor

    def broken(*a, **k):
        raise RuntimeError("C++ compiler not found\nlong internal details")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = tiny("classic")
    eager = prepare_for_inference(copy.deepcopy(model))
    compiled = prepare_for_inference(model, compile=True)
    assert compiled.generate([[1, 2, 3]], 6) == eager.generate([[1, 2, 3]], 6)
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == ("lmzoo: the decode step could not be compiled (RuntimeError: C++ compiler not found); "
                       "decoding without it")
    assert compiled.decode_step.compiled_calls == 0


def test_background_build_decodes_eagerly_then_compiled():
    """compile="background" (chat, serve): the first answer comes at once, decoded eagerly, while a
    child process compiles the step; once built, the next answers run it, with the same tokens."""
    model = tiny("classic", d_ff=80)
    eager = prepare_for_inference(copy.deepcopy(model))
    compiled = prepare_for_inference(model, compile="background")
    prompt = [[7, 8, 9, 10, 11]]
    expected = eager.generate(prompt, 8)
    assert compiled.generate(prompt, 8) == expected
    _until_compiled(compiled, compiled.decode_step, prompt, expected)
    assert not any(t.is_alive() for t in compiled.decode_step.threads)


def test_bad_compile_argument_is_one_clear_error():
    with pytest.raises(lmzoo.LmzooError, match="compile='yes'"):
        prepare_for_inference(tiny("classic"), compile="yes")


def test_machine_key_covers_torch_and_source(monkeypatch):
    """The artifact's key changes with torch's version (and so does its file name)."""
    key = compiled_module._machine_key()
    monkeypatch.setattr(compiled_module, "_MACHINE", [])
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert compiled_module._machine_key() != key


def _until_compiled(model, step, prompt, expected):
    deadline = time.time() + 300
    while step.compiled_calls == 0 and time.time() < deadline:
        assert model.generate(prompt, 8) == expected  # eager answers meanwhile, then compiled ones
        time.sleep(0.5)
    assert step.compiled_calls > 0, step.failed


def test_a_plain_model_generates_compiled_by_default_and_stays_trainable(monkeypatch):
    """lmzoo.load() then model.generate(), with no prepare call: the first answers come eagerly while
    the step builds in the background, then the compiled step runs, with the prepared path's tokens.
    The model is then fine-tuned in place: the compiled step reads the new weights (they are its
    inputs). A LoRA adapter changes the model's tensors: it gets a step of its own."""
    from lmzoo.peft import LoraConfig, add_lora

    monkeypatch.setenv("LMZOO_COMPILE", "1")  # the default (the test suite turns it off elsewhere)
    model = tiny("classic", d_ff=72)
    prompt = [[3, 4, 5, 6, 7]]
    expected = prepare_for_inference(copy.deepcopy(model)).generate(prompt, 8)
    assert model.generate(prompt, 8) == expected
    step = compiled_module._DEFAULT_STEPS[model][1]
    _until_compiled(model, step, prompt, expected)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.loss(torch.tensor([[3, 4, 5, 6, 7, 9, 9, 9, 9, 9]])).backward()
    optimizer.step()
    model.eval()
    tuned = prepare_for_inference(copy.deepcopy(model)).generate(prompt, 8)
    assert tuned != expected  # the step changed the answer...
    calls = step.compiled_calls
    assert model.generate(prompt, 8) == tuned and step.compiled_calls > calls  # ...and the compiled step sees it

    add_lora(model, LoraConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    with_adapter = model.generate(prompt, 8, compile=False)
    assert model.generate(prompt, 8) == with_adapter
    adapted = compiled_module._DEFAULT_STEPS[model][1]
    assert adapted is not step
    adapted.wait()
    assert model.generate(prompt, 8) == with_adapter and adapted.compiled_calls > 0, adapted.failed


def test_the_default_step_is_off_with_active_dropout_and_with_lmzoo_compile_0(monkeypatch):
    """lmzoo.load() returns a model in training mode, as torch does; the decoder has no dropout, so it
    decodes the same either way and gets the default step. An adapter's dropout in training mode does not."""
    from lmzoo.peft import LoraConfig, add_lora

    model = tiny("classic")
    monkeypatch.setenv("LMZOO_COMPILE", "0")
    assert compiled_module.default_step(model) is None
    monkeypatch.setenv("LMZOO_COMPILE", "1")
    assert lmzoo.load("classic")[0].training  # what a user starts from
    assert compiled_module.default_step(model.train()) is not None
    add_lora(model, LoraConfig(r=2, dropout=0.1))
    assert compiled_module.default_step(model.train()) is None
    assert compiled_module.default_step(model.eval()) is not None
    assert prepare_for_inference(model).decode_step is False  # prepared: eager unless compile=True
