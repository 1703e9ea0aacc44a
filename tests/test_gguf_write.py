"""lmzoo writes GGUF: every family llama.cpp has reads back as the same model, quantization is
gguf-py's to the bit, the embedded model round-trips exactly, and what llama.cpp cannot hold is
refused with the field named. (llama.cpp itself reads these files in tests/interop.)"""

import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.formats.gguf import rope_factors
from lmzoo.formats.gguf_file import read_gguf
from lmzoo.formats.gguf_write import save_gguf

sys.path.insert(0, os.path.dirname(__file__))
from tiny import smollm_tokenizer  # noqa: E402

TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=96, vocab_size=300, max_seq_len=128)
# preset -> the llama.cpp architecture lmzoo writes it as
WRITABLE = {"llama2-7b": "llama", "llama3.1-8b": "llama", "mistral-7b": "llama", "mixtral-8x7b": "llama",
            "qwen2-7b": "qwen2", "qwen-7b": "qwen", "gpt2": "gpt2", "chatglm2-6b": "chatglm", "chatglm3-6b": "chatglm",
            "glm4-9b": "chatglm", "glm4-9b-0414": "glm4"}


def tiny(name, **extra):
    c = lmzoo.preset(name)
    fields = {**TINY, **({"n_kv_heads": 2} if c.n_kv_heads else {}), **({"head_dim": 16} if c.head_dim else {}),
              **extra}
    torch.manual_seed(0)
    model = lmzoo.from_config(c.replace(**fields))
    with torch.no_grad():  # norms and biases away from 1 and 0, so that their layout is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def logits(model, n=20):
    with torch.no_grad():
        return model(torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", WRITABLE)
def test_every_family_reads_back_as_the_same_model(name, tmp_path):
    model = tiny(name)
    path, notes = save_gguf(model, tmp_path / "m.gguf", type="f32")
    file = read_gguf(path, load_tensors=False)
    assert file.metadata["general.architecture"] == WRITABLE[name]
    back, tokenizer = lmzoo.load(path)
    assert tokenizer is None  # a model without a tokenizer is written with tokenizer.ggml.model = none
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)
    if name == "mistral-7b":
        assert notes and "sliding_window=4096" in notes[0]  # as llama.cpp's converter, said aloud
    if name == "llama3.1-8b":  # Llama 3.1's rotary scaling travels as llama.cpp's rope_freqs tensor
        assert "rope_freqs.weight" in file.shapes and back.config.rope_scaling == "llama3"


def test_llama3_rule_is_recovered_exactly_from_its_factors():
    from lmzoo.formats.gguf import _llama3_rope

    for name in ("llama3.1-8b", "llama3.2-1b"):
        c = lmzoo.preset(name)
        read = _llama3_rope(rope_factors(c), {}, {"rope_theta": c.rope_base, "head_dim": c.head_size})["rope_scaling"]
        assert (read["factor"], read["low_freq_factor"], read["high_freq_factor"]) == \
            (c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor)


def test_factors_of_another_rule_are_refused():
    from lmzoo.formats.gguf import _llama3_rope

    c = lmzoo.preset("llama3.1-8b")
    factors = rope_factors(c)
    factors[5] *= 1.5  # a shape Llama 3's rule cannot make
    with pytest.raises(lmzoo.LmzooError, match="does not follow Llama 3's rule"):
        _llama3_rope(factors, {}, {"rope_theta": c.rope_base, "head_dim": c.head_size})


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantized_types_are_gguf_py_blocks(kind, tmp_path):
    """Each matrix is what gguf-py's quantizer makes of it (vectors stay F32), read back dequantized."""
    model = tiny("llama2-7b")
    path, _ = save_gguf(model, tmp_path / "m.gguf", type=kind)
    file = read_gguf(path)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    expected_file_type = {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}[kind]
    assert file.metadata["general.file_type"] == expected_file_type
    w = model.blocks[0].mlp.down.weight.detach().numpy()
    assert file.tensor_types["blk.0.ffn_down.weight"] == kind.upper()
    assert file.tensor_types["blk.0.attn_norm.weight"] == "F32"
    want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    np.testing.assert_array_equal(file.tensors["blk.0.ffn_down.weight"].numpy(), want)


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path):
    model = tiny("llama2-7b", d_ff=80)  # ffn_down's rows are 80 long: not whole blocks of 32
    path, _ = save_gguf(model, tmp_path / "m.gguf", type="q4_0")
    types = read_gguf(path, load_tensors=False).tensor_types
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"


def test_embedded_model_round_trip_is_exact(tmp_path):
    """lmzoo -> GGUF -> lmzoo: each tensor in the type it was read (Q4_1, Q8_0 embedding), the same logits."""
    model, tokenizer = lmzoo.load()
    path, _ = save_gguf(model, tmp_path / "smollm2.gguf", tokenizer)
    original = read_gguf(lmzoo.default_model_path(), load_tensors=False)
    written = read_gguf(path, load_tensors=False)
    assert written.tensor_types == original.tensor_types
    assert written.metadata["general.file_type"] == original.metadata["general.file_type"] == 3  # mostly Q4_1
    assert {k: v for k, v in written.metadata.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in original.metadata.items() if k.startswith("tokenizer.")}
    back, back_tokenizer = lmzoo.load(path)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert back_tokenizer.encode("héllo <|im_end|> 123") == tokenizer.encode("héllo <|im_end|> 123")


def test_vocabulary_from_tokenizer_json_equals_the_gguf_one(tmp_path):
    """A tokenizer read from tokenizer.json gives llama.cpp the same vocabulary the GGUF file had."""
    from lmzoo.formats.tokenizer import Tokenizer

    original = smollm_tokenizer()
    original.save(tmp_path)
    rebuilt = Tokenizer.from_dir(tmp_path).gguf_metadata()
    assert rebuilt == original.gguf_metadata()
    assert rebuilt["tokenizer.ggml.pre"] == "smollm"
    padded = Tokenizer.from_dir(tmp_path).gguf_metadata(49152 + 3)
    assert padded["tokenizer.ggml.tokens"][-3:] == ["[PAD49152]", "[PAD49153]", "[PAD49154]"]
    assert padded["tokenizer.ggml.token_type"][-1] == 5  # unused


@pytest.mark.parametrize("name, field", [
    ("gpt3-125m", "attention_pattern='banded'"),
    ("chatglm-6b", "lm_type='prefix'"),
    ("gpt1", "post-norm"),
])
def test_what_llama_cpp_cannot_hold_is_refused_naming_the_field(name, field, tmp_path):
    model = tiny(name, d_ff=256) if name == "gpt1" else tiny(name)
    with pytest.raises(lmzoo.LmzooError, match=field):
        save_gguf(model, tmp_path / "m.gguf")
    assert not os.listdir(tmp_path)  # nothing half-written


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    save_gguf(tiny("llama2-7b"), path, type="f32")
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(lmzoo.LmzooError, match="No space left on device.*unchanged"):
        save_gguf(tiny("qwen2-7b"), path, type="f32")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]


def test_unmerged_lora_is_refused(tmp_path):
    from lmzoo.peft import LoraConfig, add_lora

    model = tiny("llama2-7b")
    add_lora(model, LoraConfig(r=2))
    with pytest.raises(lmzoo.LmzooError, match="unmerged LoRA"):
        save_gguf(model, tmp_path / "m.gguf")


# ----------------------------------------------------------------------------- the command line
def lmzoo_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmzoo", *map(str, args)], capture_output=True, text=True)


def test_convert_and_merge_write_gguf(tmp_path):
    from tiny import tiny_dir

    src = tiny_dir(tmp_path / "src")
    run = lmzoo_cli("convert", src, tmp_path / "m.gguf", "--type", "q8_0")
    assert run.returncode == 0, run.stderr
    assert read_gguf(tmp_path / "m.gguf", load_tensors=False).tensor_types["blk.0.attn_q.weight"] == "Q8_0"

    from lmzoo.peft import LoraConfig, add_lora

    model, tokenizer = lmzoo.load(src)
    add_lora(model, LoraConfig(r=2, targets=("q", "v")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lmzoo.save_adapter(model, tmp_path / "adapter")
    run = lmzoo_cli("merge", src, tmp_path / "adapter", tmp_path / "merged.gguf", "--type", "f32")
    assert run.returncode == 0, run.stderr
    merged, _ = lmzoo.load(tmp_path / "merged.gguf")
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-4, rtol=0)  # folded: other rounding


def test_type_needs_a_gguf_output(tmp_path):
    run = lmzoo_cli("convert", "smollm2-135m", tmp_path / "out", "--type", "q4_0")
    assert run.returncode != 0 and "--type applies to GGUF output" in run.stderr
    assert "Traceback" not in run.stderr


def test_convert_lora_writes_each_update_as_llama_cpp_applies_it(tmp_path):
    """lmzoo convert-lora: per adapted matrix, alpha / rank * lora_b @ lora_a (rows back in lmzoo's
    order) is the update lmzoo adds, rsLoRA's scale and per-slice adapters of a fused matrix included."""
    from lmzoo.formats.gguf import unpermute
    from lmzoo.peft import LoraConfig, add_lora
    from lmzoo.peft.lora import lora_modules

    for name, targets, rows in (("llama2-7b", ("q", "v"), {"q": lambda t, c: unpermute(t, c.n_heads)}),
                                ("chatglm3-6b", ("q", "v", "down"), {})):
        model = tiny(name)
        add_lora(model, LoraConfig(r=4, alpha=8, targets=targets, rslora=True))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        src = tmp_path / name
        lmzoo.save_hf_dir(tiny(name), src / "base")
        lmzoo.save_adapter(model, src / "adapter")
        run = lmzoo_cli("convert-lora", src / "base", src / "adapter", src / "lora.gguf")
        assert run.returncode == 0, run.stderr
        file = read_gguf(src / "lora.gguf")
        assert file.metadata["adapter.lora.alpha"] == 8.0
        for module_name, m in lora_modules(model):
            short = module_name.rsplit(".", 1)[-1]
            block = module_name.split(".")[1]
            theirs = {"q": "attn_q", "v": "attn_v", "qkv": "attn_qkv", "down": "ffn_down"}[short]
            stem = f"blk.{block}.{theirs}.weight"
            a, b = file.tensors[f"{stem}.lora_a"], file.tensors[f"{stem}.lora_b"]
            b = rows.get(short, lambda t, c: t)(b, model.config)
            torch.testing.assert_close(8.0 / b.shape[1] * b @ a, m.delta(), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bad files: one line each
def rewrite(src, out, *, drop=(), set_keys=None, tensors=None, types=None, raw=None):
    """A copy of a GGUF file with keys dropped or changed and tensors replaced (float tensors, or
    raw: name -> (ggml bytes, type)); each written F32, or quantized to types[name] by gguf-py."""
    from lmzoo.formats.gguf_write import write_gguf_file

    file = read_gguf(src)
    metadata = {k: v for k, v in {**file.metadata, **(set_keys or {})}.items() if k not in drop}
    encoded = {}
    for name, t in {**file.tensors, **(tensors or {})}.items():
        qtype = gguf.GGMLQuantizationType[(types or {}).get(name, "F32")]
        data = t.numpy() if qtype.name == "F32" else gguf.quants.quantize(t.numpy(), qtype)
        if name in (raw or {}):
            data, qtype = raw[name][0], gguf.GGMLQuantizationType[raw[name][1]]
        encoded[name] = (data, qtype)
    return write_gguf_file(out, file.metadata["general.architecture"], metadata, encoded)


@pytest.mark.parametrize("change, message", [
    (dict(drop=["llama.attention.layer_norm_rms_epsilon"]), "lacks llama.attention.layer_norm_rms_epsilon"),
    (dict(drop=["llama.block_count"]), "lacks llama.block_count"),
    (dict(set_keys={"llama.attention.head_count": "four"}), "llama.attention.head_count is 'four', expected a number"),
    (dict(set_keys={"tokenizer.ggml.pre": "mystery"}), "tokenizer.ggml.pre is 'mystery', an unknown pre-tokenizer; "
                                                       "supported: .*smollm"),
    (dict(set_keys={"tokenizer.ggml.model": "rwkv"}), "tokenizer.ggml.model is 'rwkv'.*supported: 'gpt2'"),
    (dict(tensors={"blk.1.attn_k.weight": torch.zeros(32, 64)}), r"tensor blk\.1\.attn_k\.weight has shape \[32, 64\], "
                                                                 r"expected \[16, 64\]"),
    (dict(tensors={"blk.0.extra.weight": torch.zeros(4)}), r"unexpected tensors: blk\.0\.extra\.weight"),
    (dict(set_keys={"llama.attention.head_count": 0}), r"bad\.gguf: .*(head|ZeroDivision)"),
    (dict(set_keys={"llama.rope.scaling.type": "yarn"}), r"rope.scaling.type='yarn' is not implemented"),
])
def test_a_bad_file_is_one_clear_line(change, message, tmp_path):
    model = tiny("llama2-7b", n_kv_heads=1, vocab_size=49152)
    good, _ = save_gguf(model, tmp_path / "good.gguf", smollm_tokenizer(), type="f32")
    bad = rewrite(good, tmp_path / "bad.gguf", **change)
    with pytest.raises(lmzoo.LmzooError, match=message):
        lmzoo.load(bad)
    run = lmzoo_cli("generate", "hi", "--model", bad, "--max-new-tokens", "1")  # the kept-quantized loader
    assert run.returncode != 0 and re.search(message, run.stderr)
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
