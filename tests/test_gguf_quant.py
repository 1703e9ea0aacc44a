"""A quantized GGUF file run with its weights kept quantized (lmzoo.infer.gguf_quant): Q4_0/Q4_1
blocks become int4 groups exactly, other types int8 rows, and the model computes what the
dequantized float model computes, up to the int4/int8 kernels' bf16 arithmetic."""

import math
import os
import sys

import gguf
import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.formats.gguf_file import read_gguf
from lmzoo.formats.gguf_write import save_gguf
from lmzoo.infer.gguf_quant import load_gguf_quantized, q4_parts
from lmzoo.infer.quant import Int4Linear, Int8Linear

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf_write import rewrite, tiny  # noqa: E402


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q4_K blocks (gguf-py cannot write K-quants): random 6-bit scales and mins, nibbles, and float16
    super-block scales, byte for byte as ggml lays them out."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    blocks = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    blocks[:, 0:2] = (rng.random(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = (rng.random(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_blocks_are_int4_groups_exactly(kind):
    w = torch.randn(48, 256).numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = random_q4_k(48, 256) if kind == "Q4_K" else gguf.quants.quantize(w, qtype)
    w = gguf.quants.dequantize(blocks, qtype)
    q, scale, zero = q4_parts(torch.from_numpy(blocks), kind)
    ours = (q.float() - 8).reshape(48, 8, 32) * scale[..., None] + zero[..., None]
    np.testing.assert_allclose(ours.reshape(48, 256).numpy(), w, rtol=0, atol=float(np.abs(w).max()) * 1e-6)
    layer = Int4Linear(None, parts=(q, scale, zero, None))  # the kernel reads them with bf16 scales
    np.testing.assert_allclose(layer.dequantized().numpy(), gguf.quants.dequantize(blocks, qtype), rtol=0,
                               atol=float(np.abs(w).max()) / 64)


def _agreement(a, b):
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("name, kind", [("llama2-7b", "q4_0"), ("llama2-7b", "q4_1"), ("llama2-7b", "q8_0"),
                                        ("mixtral-8x7b", "q4_0"), ("qwen2-7b", "q4_1"), ("chatglm3-6b", "q4_0"),
                                        ("glm4-9b", "q4_1"), ("gpt2", "q4_0")])
def test_kept_quantized_computes_the_dequantized_model(name, kind, tmp_path):
    """Row permutation (llama's q/k), expert stacking, q|k|v fusion and biases applied to the
    blocks themselves: the same model as the float one the same file loads as."""
    from lmzoo.infer.fuse import fuse_projections

    path, _ = save_gguf(tiny(name, d_model=128, d_ff=256), tmp_path / "m.gguf", type=kind)
    dense, _ = lmzoo.load(path)
    kept, _ = load_gguf_quantized(path)
    fuse_projections(dense)  # so that each kept matrix has a float twin of the same name
    layers = {n: m for n, m in kept.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    blocks = [m for n, m in layers.items() if "blocks" in n]
    assert blocks and all(isinstance(m, Int8Linear if kind == "q8_0" else Int4Linear) for m in blocks)
    for n, m in layers.items():  # each matrix as its kernel reads it: the float one, up to bf16 / int8 rounding
        w = dense.get_submodule(n).weight.detach()
        step = w.abs().max() / (128 if isinstance(m, Int4Linear) else 100)
        torch.testing.assert_close(m.dequantized(), w, atol=step.item(), rtol=0, msg=n)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = kept(ids), dense(ids)
    # and the whole model: bf16 activations and an int8 head move the logits by <10% of their spread
    assert (a - b).abs().max() < 0.25 * b.std() and _agreement(a, b) > 0.9


def test_embedded_model_kept_quantized_agrees_with_fp32():
    """The embedded Q4_1 model as `lmzoo generate` runs it: int4 blocks, an int8 head; next-token
    agreement and perplexity on a paragraph, against the same file dequantized to fp32."""
    kept, tok = load_gguf_quantized()
    dense, _ = lmzoo.load()
    assert read_gguf(lmzoo.default_model_path(), load_tensors=False).tensor_types["blk.0.attn_q.weight"] == "Q4_1"
    assert isinstance(kept.blocks[0].attn.qkv, Int4Linear) and isinstance(kept.lm_head, Int8Linear)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, for museums such as the Louvre, "
            "and for its cafes. Many tourists visit the city every year to see the sights and to enjoy the food.")
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        a, b = kept(ids), dense(ids)

    def perplexity(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert _agreement(a, b) >= 0.95
    assert abs(perplexity(a) / perplexity(b) - 1) < 0.05


def test_generate_runs_gguf_kept_quantized_unless_dtype_says_float(monkeypatch):
    from lmzoo.infer.gguf_quant import keeps_quantized

    assert keeps_quantized(None, None, None, None, None)  # the embedded model, by default
    assert keeps_quantized("m.gguf", None, "cpu", None, None)
    assert not keeps_quantized("m.gguf", "float32", None, None, None)  # for training and parity checks
    assert not keeps_quantized("m.gguf", None, None, "int8", None)
    assert not keeps_quantized("m.gguf", None, None, None, "out/adapter")  # LoRA folds into float weights
    assert not keeps_quantized("hf_dir", None, None, None, None)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_quantized_embedding_rows_are_the_files(kind):
    from lmzoo.formats.gguf_file import dequantize_rows
    from lmzoo.infer.gguf_quant import QuantizedEmbedding

    w = torch.randn(50, 64).numpy()
    rows = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]))
    embedding = QuantizedEmbedding(rows, kind, 64)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    torch.testing.assert_close(embedding(ids), dequantize_rows(rows, kind)[ids], atol=0, rtol=0)
    assert embedding.weight.dtype == torch.float32 and embedding.weight.numel() == 0


def test_q4_k_file_is_kept_4_bit(tmp_path):
    """A Q4_K file (Q4_K matrices, a Q8_0 head): Q4_K as int4 groups, Q8_0 as int8 rows; each
    matrix as the float loader dequantizes it (gguf-py), llama's q/k rows permuted on the blocks."""
    from lmzoo.infer.fuse import fuse_projections

    src, _ = save_gguf(tiny("llama2-7b", d_model=256, d_ff=512), tmp_path / "f32.gguf", type="f32")
    shapes = read_gguf(src, load_tensors=False).shapes
    q4_k = {n: (random_q4_k(*s, seed=i), "Q4_K") for i, (n, s) in enumerate(shapes.items())
            if len(s) == 2 and n.startswith("blk.")}
    rewrite(src, tmp_path / "k.gguf", raw=q4_k, types={"output.weight": "Q8_0"})
    dense, _ = lmzoo.load(tmp_path / "k.gguf")
    kept, _ = load_gguf_quantized(str(tmp_path / "k.gguf"))
    _, notes = save_gguf(dense, tmp_path / "again.gguf")  # --type auto: gguf-py writes no K-quants, and says so
    assert any("Q4_K are written as Q8_0" in note for note in notes)
    fuse_projections(dense)
    assert isinstance(kept.blocks[0].attn.qkv, Int4Linear) and isinstance(kept.lm_head, Int8Linear)
    for n, m in kept.named_modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            w = dense.get_submodule(n).weight.detach()
            step = w.abs().max() / (128 if isinstance(m, Int4Linear) else 100)
            torch.testing.assert_close(m.dequantized(), w, atol=step.item(), rtol=0, msg=n)


def assert_layers_match(kept, dense):
    from lmzoo.infer.fuse import fuse_projections

    fuse_projections(dense)
    for n, m in kept.named_modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            w = dense.get_submodule(n).weight.detach()
            step = w.abs().max() / (128 if isinstance(m, Int4Linear) else 100)
            torch.testing.assert_close(m.dequantized(), w, atol=step.item(), rtol=0, msg=n)


@pytest.mark.parametrize("name, d_model, v_type", [
    ("llama2-7b", 128, "Q8_0"),   # a Q4_K_M-like mix: q, k 4-bit, v 8-bit: the fused q|k|v goes int8
    ("llama2-7b", 96, "Q4_0"),    # parts of 96 rows: not whole blocks of the int4 packing's 64
    ("glm4-9b", 128, "Q8_0"),     # chatglm's separate q, k, v of two types, fused on load
])
def test_mixed_types_and_odd_sizes(name, d_model, v_type, tmp_path):
    glm = {"head_dim": d_model // 4, "fused_qkv": False} if name == "glm4-9b" else {}  # transformers' glm
    model = tiny(name, d_model=d_model, d_ff=2 * d_model, **glm)
    src, _ = save_gguf(model, tmp_path / "f32.gguf", type="f32")
    names = read_gguf(src, load_tensors=False).shapes
    types = {n: "Q4_0" for n, s in names.items() if len(s) == 2 and n.startswith("blk.")}
    types.update({n: v_type for n in names if ".attn_v." in n and n.endswith("weight")})
    path = rewrite(src, tmp_path / "mixed.gguf", types=types)
    dense, _ = lmzoo.load(path)
    kept, _ = load_gguf_quantized(path)
    assert isinstance(kept.blocks[0].attn.qkv, Int8Linear if v_type == "Q8_0" else Int4Linear)
    assert_layers_match(kept, dense)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _agreement(kept(ids), dense(ids)) > 0.9
