"""Read a GGUF file: its metadata as plain Python, its tensors dequantized to float32 torch tensors.

GGUF layout (v2/v3, little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 KV count,
the KV pairs, then one info record per tensor (name, dims fastest-first, ggml type, offset), then
padding to `general.alignment` and the tensor data.

We parse the header ourselves rather than with `gguf.GGUFReader`: the reader builds one numpy object
per array element, which takes seconds for a 49k-token vocabulary, while metadata-only reads must be
fast. The dequantization itself is done by `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from lmzoo.errors import LmzooError

# Every type listed here is checked against an independent numpy reference in tests/test_gguf_file.py.
SUPPORTED_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
)

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF metadata value type id -> little-endian struct format (8 = string, 9 = array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRUCTS = {t: struct.Struct(f) for t, f in _SCALARS.items()}
_U32, _U64 = _STRUCTS[4], _STRUCTS[10]
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]  # every KV field as plain Python: str, int, float, bool, list
    tensors: dict[str, torch.Tensor]  # float32, PyTorch orientation (dims reversed from GGUF)
    tensor_types: dict[str, str]  # tensor name -> ggml type name, e.g. "Q4_1"
    # PyTorch-orientation shapes, filled even when load_tensors=False (e.g. to size a model).
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # where each tensor's bytes are: name -> (ggml type, shape, absolute offset, byte count); and the map
    _infos: dict = field(default_factory=dict, repr=False)
    _data: Any = field(default=None, repr=False)

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as ggml stores them, uint8 [*shape[:-1], bytes per row] (a view of the
        file: nothing is read until used). Blocks run along rows, so row operations are exact."""
        qtype, shape, start, n_bytes = self._infos[name]
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * type_size
        with warnings.catch_warnings():  # a read-only view of the map, never written to
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self._data[start:start + n_bytes].reshape(*shape[:-1], row_bytes))

    def release_pages(self) -> None:
        """Drop the file's pages from this process's memory (they stay in the OS page cache, and a
        later read faults them back in): a loader that converts one tensor at a time calls it so
        that the file it has already converted does not stay resident beside the result."""
        mapping = getattr(self._data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def dequantized(self, name: str) -> torch.Tensor:
        """One tensor as float32, read now (the others stay on disk)."""
        qtype, shape, start, n_bytes = self._infos[name]
        return _dequantize(self._data, self.path, name, qtype, shape, start, n_bytes)


class _Cursor:
    """Sequential little-endian reads over the header; running off the end means the file is cut short.

    Uses `struct` on a memoryview rather than numpy per value: vocabularies have ~50k strings each.
    """

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def truncated(self, what: str, need: int) -> LmzooError:
        return LmzooError(f"{self.path}: file is truncated or corrupt: {what} needs bytes "
                          f"{self.pos}..{self.pos + need} but the file has {len(self.buf)} bytes")

    def unpack(self, st: struct.Struct, what: str) -> Any:
        try:
            (value,) = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.truncated(what, st.size) from None
        self.pos += st.size
        return value

    def string(self, what: str) -> str:
        n = self.unpack(_U64, what)
        if self.pos + n > len(self.buf):
            raise self.truncated(what, n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LmzooError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def numbers(self, vtype: int, count: int, what: str) -> list:
        dtype = np.dtype(_SCALARS[vtype])
        if self.pos + count * dtype.itemsize > len(self.buf):
            raise self.truncated(what, count * dtype.itemsize)
        out = np.frombuffer(self.buf, dtype, count, self.pos).tolist()  # one vectorised read
        self.pos += count * dtype.itemsize
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype in _STRUCTS:
            return self.unpack(_STRUCTS[vtype], what)
        if vtype == _ARRAY:
            item_type, count = self.unpack(_U32, what), self.unpack(_U64, what)
            if item_type == _ARRAY:  # as llama.cpp: no arrays of arrays (and no unbounded recursion)
                raise LmzooError(f"{self.path}: {what} is an array of arrays, which GGUF does not allow")
            if item_type in _STRUCTS:
                return self.numbers(item_type, count, what)
            if count > len(self.buf):  # each item takes at least one byte: a huge count is corruption
                raise LmzooError(f"{self.path}: file is truncated or corrupt: {what} claims {count} items")
            return [self.value(item_type, what) for _ in range(count)]
        raise LmzooError(f"{self.path}: {what} has unknown GGUF value type {vtype}")


def _check_magic(path: str) -> int:
    if not os.path.isfile(path):
        raise LmzooError(f"{path}: no such GGUF file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LmzooError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    if head[:4] != _MAGIC:
        raise LmzooError(f"{path}: not a GGUF file (expected magic {_MAGIC!r}, found {head[:4]!r})")
    if len(head) < 8:
        raise LmzooError(f"{path}: file is truncated or corrupt: it ends inside the header ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version and version & 0xFFFF == 0:  # a small version number read in the wrong byte order
        raise LmzooError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise LmzooError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    return size


def read_gguf(path: str | os.PathLike, *, load_tensors: bool | Collection[str] = True) -> GGUFFile:
    """Parse `path`; with load_tensors=False only the header is read (no tensor data is touched),
    with a collection of names only those tensors (where the file has them)."""
    path = os.fspath(path)
    size = _check_magic(path)
    # A read-only memmap: the header is parsed from it, and tensor data is paged in only when loaded.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), path)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack(_U64, "tensor count"), cur.unpack(_U64, "KV count")
    # Counts are checked against the file's size before any loop runs over them: a KV pair takes at
    # least 12 bytes (key length, type), a tensor's info at least 24 (name length, n_dims, type, offset).
    for count, least, what in ((n_kv, 12, "KV count"), (n_tensors, 24, "tensor count")):
        if count * least > size:
            raise LmzooError(f"{path}: file is truncated or corrupt: {what} {count} does not fit in its "
                             f"{size} bytes")

    metadata: dict[str, Any] = {}
    alignment_type = None
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise LmzooError(f"{path}: metadata key {key!r} appears twice")
        vtype = cur.unpack(_U32, f"type of field {key!r}")
        metadata[key] = cur.value(vtype, f"field {key!r}")
        if key == "general.alignment":
            alignment_type = vtype

    infos = {}  # name -> (qtype, torch-order shape, offset relative to the data section, byte count)
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        what = f"info of tensor {name!r}"
        n_dims = cur.unpack(_U32, what)
        if n_dims > _MAX_DIMS:
            raise LmzooError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows at most {_MAX_DIMS}")
        dims = cur.numbers(10, n_dims, what)  # 10 = uint64
        for d in dims:
            if d == 0 or d >= 2**63:  # int64 in ggml: the top half of uint64 reads as negative
                size_text = "a dimension of 0" if d == 0 else f"a negative dimension ({d - 2**64})"
                raise LmzooError(f"{path}: tensor {name!r} has {size_text}")
        type_id, offset = cur.unpack(_U32, what), cur.unpack(_U64, what)
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise LmzooError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:  # blocks run along the fastest dim, so it must divide evenly
            raise LmzooError(f"{path}: tensor {name!r} ({qtype.name}) has row length {dims[0]}, "
                             f"expected a multiple of the block size {block}")
        if name in infos:
            raise LmzooError(f"{path}: tensor {name!r} appears twice in the tensor list")
        n_bytes = math.prod(dims) // block * type_size
        infos[name] = (qtype, tuple(reversed(dims)), offset, n_bytes)

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if alignment_type not in (None, 4):  # 4 = UINT32, as llama.cpp requires
        raise LmzooError(f"{path}: field 'general.alignment' must be a UINT32 (GGUF type 4), not type {alignment_type}")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise LmzooError(f"{path}: field 'general.alignment' is {alignment!r}, expected a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    # As llama.cpp: each tensor starts where the one before it ends, rounded up to the alignment, so
    # no two overlap, none leaves a gap, and none points elsewhere in the file.
    expected = 0
    for name, (_qtype, _shape, offset, n_bytes) in infos.items():
        if offset != expected:
            raise LmzooError(f"{path}: tensor {name!r} starts at data offset {offset}, expected {expected} "
                             "(tensors must follow each other in order, aligned)")
        expected = -(-(offset + n_bytes) // alignment) * alignment

    # Check every data range up front, so a cut-short download fails clearly even without loading.
    for name, (_qtype, _shape, offset, n_bytes) in infos.items():
        if data_start + offset + n_bytes > size:
            raise LmzooError(f"{path}: file is truncated or corrupt: tensor {name!r} needs bytes "
                             f"{data_start + offset}..{data_start + offset + n_bytes}, file has {size}")

    tensors: dict[str, torch.Tensor] = {}
    if load_tensors:
        wanted = infos if load_tensors is True else [n for n in load_tensors if n in infos]
        for name in wanted:
            qtype, shape, offset, n_bytes = infos[name]
            tensors[name] = _dequantize(data, path, name, qtype, shape, data_start + offset, n_bytes)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors,
                    tensor_types={n: i[0].name for n, i in infos.items()},
                    shapes={n: i[1] for n, i in infos.items()},
                    _infos={n: (q, shape, data_start + offset, n_bytes)
                            for n, (q, shape, offset, n_bytes) in infos.items()},
                    _data=data)


def _dequantize(buf: np.ndarray, path: str, name: str, qtype: GGMLQuantizationType,
                shape: tuple[int, ...], start: int, n_bytes: int) -> torch.Tensor:
    if qtype.name not in SUPPORTED_TYPES:
        raise LmzooError(f"{path}: tensor {name!r} has type {qtype.name}, which lmzoo cannot dequantize; "
                         f"supported types: {', '.join(SUPPORTED_TYPES)}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    # gguf's dequantize takes rows of raw bytes (last dim = bytes per row) and returns float rows.
    row_bytes = shape[-1] // block * type_size if shape else type_size
    raw = buf[start:start + n_bytes].reshape(*shape[:-1], row_bytes)
    try:
        fast = _BLOCK_DEQUANTIZERS.get(qtype.name)
        out = (fast(raw) if fast else dequantize(raw, qtype)).astype(np.float32, copy=False).reshape(shape)
    except (ValueError, IndexError, TypeError) as e:  # a malformed block layout, not a user mistake
        raise LmzooError(f"{path}: tensor {name!r} ({qtype.name}) is corrupt: {e}") from None
    if not out.flags.writeable:  # F32 comes back as a view of the read-only memmap: detach it
        out = out.copy()
    return torch.from_numpy(out)


def dequantize_rows(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Rows of ggml bytes [..., bytes per row] (as GGUFFile.raw gives them) -> float32 [..., row]."""
    qtype = GGMLQuantizationType[type_name]
    if type_name not in SUPPORTED_TYPES:
        raise LmzooError(f"type {type_name} cannot be dequantized; supported types: {', '.join(SUPPORTED_TYPES)}")
    data = raw.contiguous().numpy()
    fast = _BLOCK_DEQUANTIZERS.get(type_name)
    out = np.ascontiguousarray(fast(data) if fast else dequantize(data, qtype), dtype=np.float32)
    if not out.flags.writeable or np.shares_memory(out, data):  # F32 rows come back as a view of the file
        out = out.copy()
    return torch.from_numpy(out.reshape(*raw.shape[:-1], -1))


# The three commonest block types, dequantized over a structured view of the whole tensor: the
# same float32 operations as gguf.quants, so the same bits, in ~40% of its time (its per-group
# splitting copies each block; this start-up cost is what a user waits for).
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Each block's 32 four-bit values: the low nibbles are values 0-15, the high ones 16-31."""
    q = np.empty((len(qs), 32), np.float32)
    q[:, :16] = qs & 0x0F
    q[:, 16:] = qs >> 4
    return q


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(raw).reshape(-1).view(_Q4_0)
    return b["d"].astype(np.float32)[:, None] * (_nibbles(b["qs"]) - np.float32(8))


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(raw).reshape(-1).view(_Q4_1)
    return b["d"].astype(np.float32)[:, None] * _nibbles(b["qs"]) + b["m"].astype(np.float32)[:, None]


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(raw).reshape(-1).view(_Q8_0)
    return b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]


_BLOCK_DEQUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}

