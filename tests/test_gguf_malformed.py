"""Malformed GGUF files, after llama.cpp's tests/test-gguf.cpp: each is refused with one
LmzooError naming the file and what is wrong, before anything of its claimed size is allocated."""

import struct

import numpy as np
import pytest

import lmzoo
from lmzoo.formats.gguf_file import read_gguf

U8, U32, I32, F32, BOOL, STR, ARR, U64 = 0, 4, 5, 6, 7, 8, 9, 10
Q8_0, TYPE_F32 = 8, 0


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def u32(x):
    return struct.pack("<I", x)


def tensor_info(name, dims, ggml_type=TYPE_F32, offset=0) -> bytes:
    return string(name) + u32(len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + u32(ggml_type) + \
        struct.pack("<Q", offset)


def gguf(kvs=(), infos=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32, magic=b"GGUF") -> bytes:
    head = magic + u32(version) + struct.pack("<Q", len(infos) if n_tensors is None else n_tensors) + \
        struct.pack("<Q", len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def f32_data(n):
    return np.arange(n, dtype=np.float32).tobytes()


GOOD = gguf([kv("general.name", STR, string("ok"))],
            [tensor_info("a", [4, 2], offset=0), tensor_info("b", [8], offset=32)],
            f32_data(8) + f32_data(8))

CASES = {
    "bad magic": (gguf(magic=b"GGUX"), "not a GGUF file"),
    "version 0": (gguf(version=0), "GGUF version 0 is not supported"),
    "version 1": (gguf(version=1), "GGUF version 1 is not supported"),
    "a version newer than known": (gguf(version=4), "GGUF version 4 is not supported"),
    "a tensor count of 2^64-1": (gguf(n_tensors=2**64 - 1), "tensor count 18446744073709551615"),
    "a KV count of 2^64-1": (gguf(n_kv=2**64 - 1), "KV count 18446744073709551615"),
    "a key length past the end": (gguf([struct.pack("<Q", 10**6) + b"key"]), "truncated or corrupt"),
    "a string value past the end": (gguf([kv("k", STR, struct.pack("<Q", 2**40) + b"abc")]),
                                    "truncated or corrupt"),
    "a nested array": (gguf([kv("k", ARR, u32(ARR) + struct.pack("<Q", 1) + u32(U8) + struct.pack("<Q", 1) + b"x")]),
                       "an array of arrays"),
    "a huge array count": (gguf([kv("k", ARR, u32(U32) + struct.pack("<Q", 2**62))]), "truncated or corrupt"),
    "a huge array of strings": (gguf([kv("k", ARR, u32(STR) + struct.pack("<Q", 2**62))]), "claims"),
    "an unknown value type": (gguf([kv("k", 13, b"")]), "unknown GGUF value type 13"),
    "a duplicate key": (gguf([kv("k", U8, b"\1"), kv("k", U8, b"\2")]), "key 'k' appears twice"),
    "a duplicate tensor name": (gguf([], [tensor_info("a", [8]), tensor_info("a", [8], offset=32)], f32_data(16)),
                                "tensor 'a' appears twice"),
    "alignment 0": (gguf([kv("general.alignment", U32, u32(0))]), "general.alignment"),
    "alignment not a power of two": (gguf([kv("general.alignment", U32, u32(48))], alignment=48),
                                     "general.alignment"),
    "alignment not UINT32": (gguf([kv("general.alignment", U64, struct.pack("<Q", 32))]), "must be a UINT32"),
    "five dimensions": (gguf([], [tensor_info("a", [1, 1, 1, 1, 8])], f32_data(8)), "5 dimensions"),
    "a zero dimension": (gguf([], [tensor_info("a", [0, 8])]), "a dimension of 0"),
    "a negative dimension": (gguf([], [tensor_info("a", [2**64 - 8])]), "negative"),
    "dimensions whose byte size overflows": (gguf([], [tensor_info("a", [2**31, 2**31, 2**31, 2**31])]),
                                             "truncated or corrupt"),
    "a type id out of range": (gguf([], [tensor_info("a", [8], ggml_type=1000)], f32_data(8)),
                               "unknown ggml type id 1000"),
    "a row not a multiple of the block": (gguf([], [tensor_info("a", [33], ggml_type=Q8_0)], b"\0" * 64),
                                          "multiple of the block size 32"),
    "offsets not contiguous": (gguf([], [tensor_info("a", [8]), tensor_info("b", [8], offset=64)],
                                    f32_data(8) + b"\0" * 32 + f32_data(8)), "tensor 'b' starts at data offset 64"),
    "overlapping offsets": (gguf([], [tensor_info("a", [8]), tensor_info("b", [8], offset=16)], f32_data(16)),
                            "tensor 'b' starts at data offset 16"),
    "an offset past the end": (gguf([], [tensor_info("a", [8], offset=2**40)], f32_data(8)),
                               "tensor 'a' starts at data offset 1099511627776"),
    "truncated tensor data": (GOOD[:-5], "truncated or corrupt"),
    "a header cut short": (GOOD[:30], "truncated or corrupt"),
}


def test_the_good_file_reads(tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(GOOD)
    f = read_gguf(path)
    assert f.metadata == {"general.name": "ok"} and list(f.tensors) == ["a", "b"]
    assert f.tensors["a"].flatten().tolist() == list(range(8)) == f.tensors["b"].tolist()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("load_tensors", [False, True])
def test_a_malformed_gguf_is_one_clear_error(tmp_path, case, load_tensors):
    content, message = CASES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(lmzoo.LmzooError) as e:
        read_gguf(path, load_tensors=load_tensors)
    text = str(e.value)
    assert str(path) in text and message in text and "\n" not in text, text
