"""Load a quantized GGUF file for inference with its weights kept quantized: never fp32 first.

A 4-bit GGUF block (Q4_0, Q4_1: 32 weights, a float16 scale, and for Q4_1 a float16 minimum;
Q4_K: 8 such groups of 32 under one super-block scale) is exactly one group of lmzoo's int4
layer (lmzoo.infer.quant.Int4Linear), whose kernel computes (q - 8) * scale + zero:

    Q4_0: w = d * (q - 8)             ->  scale = d,        zero = 0
    Q4_1: w = d * q + m               ->  scale = d,        zero = m + 8 d
    Q4_K: w = d sc_j * q - dmin m_j   ->  scale = d sc_j,   zero = 8 d sc_j - dmin m_j

so those matrices go from the file's bytes to the packed int4 layout directly (the scales
rounded to bf16, the kernel's type). Any other type (Q8_0, the K-quants, F16, ...) is
dequantized one matrix at a time and kept as int8 per output row (Int8Linear): 8 bits, and
no more float memory than one matrix needs. Embeddings and norms are float32. Rows are
whole in every ggml type, so llama.cpp's q/k row permutation, stacked experts and q|k|v
fusion are applied to the blocks themselves, by the same functions that load a float model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LmzooError
from ..formats import gguf as gguf_format
from ..formats.checkpoint import build_meta_checked
from ..formats.gguf_file import dequantize_rows, read_gguf
from ..formats.names import to_ours
from ..nn.linear import is_plain_linear
from .fuse import fuse_projections
from .quant import Int4Linear, Int8Linear, int8_rows

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
# The CPU int4 packing interleaves rows within blocks of 64: pieces packed apart concatenate only
# when each starts on such a boundary.
PACK_ROWS = 64
CHUNK = 4096  # rows converted at a time
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def q4_parts(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K rows of bytes [n, blocks * size] -> (q [n, k] in 0..15, scale, zero [n, k / 32])."""
    if qtype == "Q4_K":
        return _q4_k_parts(raw)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[qtype])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if qtype == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        qs, zero = blocks[..., 4:], m + 8 * d
    else:
        qs, zero = blocks[..., 2:], torch.zeros_like(d)
    # each block's 32 values: the low nibbles are values 0-15, the high ones 16-31
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)
    return q.to(torch.int32), d, zero


def keeps_quantized(source, dtype, device, quantize, adapter) -> bool:
    """Whether an inference command runs a GGUF file's matrices as they are stored (4-bit blocks
    as int4, others as int8: lmzoo.infer.gguf_quant) rather than dequantized to float: for a
    .gguf source (the embedded model is one) on the CPU, unless --dtype, --quantize or an adapter
    (which needs float weights to fold into) asks for floats."""
    is_gguf = source is None or str(source).endswith(".gguf")
    return is_gguf and dtype is None and quantize is None and adapter is None and device in (None, "cpu")


def _q4_k_parts(raw: torch.Tensor):
    """Q4_K: super-blocks of 256 = 8 groups of 32, w = d * sc_j * q - dmin * m_j with 6-bit sc_j, m_j
    (packed in 12 bytes, as ggml's get_scale_min_k4 reads them): scale = d sc_j, zero = 8 scale - dmin m_j."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 144)  # d, dmin (float16), 12 bytes of scales and mins, 128 bytes of nibbles
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    dmin = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    packed = blocks[..., 4:16].reshape(n, -1, 3, 4)
    low, high, rest = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = torch.cat([low & 0x3F, (rest & 0x0F) | ((low >> 2) & 0x30)], -1).float()  # [n, blocks, 8]
    mins = torch.cat([high & 0x3F, (rest >> 4) | ((high >> 2) & 0x30)], -1).float()
    qs = blocks[..., 16:].reshape(n, -1, 4, 1, 32)  # 4 x 32 bytes: low nibbles are group 2i, high ones 2i + 1
    q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, -1)
    scale = d[..., None] * sc
    zero = 8 * scale - dmin[..., None] * mins
    return q.to(torch.int32), scale.reshape(n, -1), zero.reshape(n, -1)


def load_gguf_quantized(path: str | None = None):
    """(model, tokenizer) for inference, its matrices 4- or 8-bit as described above (path None:
    the embedded model)."""
    from ..formats.checkpoint import default_model_path
    from ..formats.tokenizer import Tokenizer

    path = path or default_model_path()
    file = read_gguf(path, load_tensors=False)
    rope = file.dequantized("rope_freqs.weight") if "rope_freqs.weight" in file.shapes else None
    arch, config = gguf_format.read_arch(file.metadata, file.shapes.keys(), path, rope)
    model = build_meta_checked(config, {n: torch.empty(s, device="meta") for n, s in file.shapes.items()},
                               arch, path)
    matrices = [n for n, s in file.shapes.items() if len(s) >= 2]
    types = dict(file.tensor_types)
    rows = {n: file.raw(n) for n in matrices}
    _uniform_parts(file, arch, rows, types)
    raw = _OurRows(gguf_format.prepare_tensors(arch, rows), arch.names, config)
    kinds = {ours: types.get(gguf_format.stacked_name(arch.names.their_name(ours)))
             or _fused_type(types, arch, ours) for ours in raw}
    vectors = [n for n, s in file.shapes.items() if len(s) < 2 and n != "rope_freqs.weight"]
    floats = to_ours(gguf_format.prepare_tensors(arch, {n: file.dequantized(n) for n in vectors}),
                     arch.names, config)[0]

    def dequantized(ours: str) -> torch.Tensor:  # in chunks of rows: numpy's temporaries stay small
        rows = raw[ours]
        return torch.cat([dequantize_rows(rows[i:i + CHUNK], kinds[ours]) for i in range(0, len(rows), CHUNK)])

    fuse_projections(model)  # on the meta model: q|k|v and gate|up become one module each
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not is_plain_linear(module):
                continue
            parts = _parts(name, model)  # our unfused weight names, in row order
            bias = _bias(name, parts, floats)
            if name == "lm_head" and config.tie_embeddings:
                parts = ["tok_emb.weight"]
            if name.endswith("router"):  # routing scores pick the experts: kept exact, as quantize() does
                new = nn.Linear(module.in_features, module.out_features, bias=False)
                new.weight.copy_(torch.cat([dequantized(p) for p in parts]))
            elif all(kinds[p] in FOUR_BIT for p in parts) and module.out_features % 16 == 0:  # the kernel's tiles
                if all(len(raw[p]) % PACK_ROWS == 0 for p in parts):
                    # in chunks of rows, so that a 100M-weight head never exists as int32 or float at once
                    packed, scales, zeros = zip(*(_int4_rows(raw[p][i:i + CHUNK], kinds[p])
                                                  for p in parts for i in range(0, len(raw[p]), CHUNK)), strict=True)
                    new = Int4Linear(None, parts=(torch.cat(packed), torch.cat(scales), torch.cat(zeros), bias))
                else:  # packed pieces would not meet at the packing's 64-row boundaries: pack it whole
                    qs, scales, zeros = zip(*(q4_parts(raw[p], kinds[p]) for p in parts), strict=True)
                    new = Int4Linear(None, parts=(torch.cat(qs), torch.cat(scales), torch.cat(zeros), bias))
            else:
                qweight, scale = zip(*(int8_rows(dequantize_rows(raw[p][i:i + CHUNK], kinds[p]))
                                       for p in parts for i in range(0, len(raw[p]), CHUNK)), strict=True)
                new = Int8Linear(None, parts=(torch.cat(qweight), torch.cat(scale), bias))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            file.release_pages()  # the blocks just packed need not stay resident beside their int4 copy
        if kinds["tok_emb.weight"] not in ("F32", "F16", "BF16"):  # its rows are dequantized when looked up
            model.tok_emb = QuantizedEmbedding(raw["tok_emb.weight"].clone(), kinds["tok_emb.weight"], config.d_model)
        for name, p in list(model.named_parameters()):  # what is left: embeddings, norms (float32)
            if p.is_meta:
                value = floats[name] if name in floats else dequantized(name)
                _assign(model, name, nn.Parameter(value.float(), requires_grad=False))
    model.quantized = "gguf"
    has_vocab = file.metadata.get("tokenizer.ggml.model") not in (None, "none", "no_vocab")
    return model.eval(), Tokenizer.from_gguf_metadata(file.metadata, path) if has_vocab else None


class QuantizedEmbedding(nn.Module):
    """A token embedding kept in its file's blocks; the rows looked up are dequantized (float32).

    For a 49k x 2048 vocabulary that is 57 MB in Q4_0 instead of 400 MB. `weight` is an empty
    float32 tensor, there only to tell code that asks the embedding for the model's dtype and
    device; reading values from it fails (IndexError) rather than giving wrong numbers."""

    def __init__(self, rows: torch.Tensor, kind: str, dim: int):
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("probe", torch.empty(0, dim), persistent=False)
        self.kind, self.embedding_dim = kind, dim
        # other types dequantize in numpy, which a compiled step must not trace; disable() imports
        # torch._dynamo (~0.9 s), so only for them
        self._numpy_rows = None if kind in ("Q4_0", "Q4_1", "Q8_0") else torch.compiler.disable(dequantize_rows)

    @property
    def weight(self) -> torch.Tensor:
        return self.probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows[ids.reshape(-1)]
        if self.kind in ("Q4_0", "Q4_1"):  # torch ops only, so that a compiled decode step traces through
            q, scale, zero = q4_parts(rows, self.kind)
            out = (q.float() - 8).unflatten(-1, (-1, 32)) * scale[..., None] + zero[..., None]
        elif self.kind == "Q8_0":
            blocks = rows.unflatten(-1, (-1, 34))
            d = blocks[..., 0:2].contiguous().view(torch.float16).float()
            out = blocks[..., 2:].contiguous().view(torch.int8).float() * d
        else:
            out = self._numpy_rows(rows, self.kind)
        return out.reshape(*ids.shape, self.embedding_dim)


def _int4_rows(raw: torch.Tensor, qtype: str):
    """Q4 rows -> (rows packed for the CPU int4 kernel, scale, zero)."""
    q, scale, zero = q4_parts(raw, qtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 8), scale, zero


class _OurRows(Mapping):
    """The file's rows under our names, each transformed (llama's q/k row permutation) when read,
    not all at once: a 70B file's permuted q and k would otherwise be ~3 GB of copies side by side.
    The last few are kept, since a module reads its rows more than once."""

    def __init__(self, prepared: dict, names, config):
        self._prepared, self._config = prepared, config
        self._source = {}
        for theirs in prepared:
            ours, transform = names.ours(theirs)
            if ours is not None:
                self._source[ours] = (theirs, transform)
        self._recent: dict = {}

    def __getitem__(self, ours: str) -> torch.Tensor:
        if ours not in self._recent:
            theirs, transform = self._source[ours]
            rows = self._prepared[theirs]
            self._recent[ours] = transform(rows, self._config) if transform else rows
            while len(self._recent) > 4:
                self._recent.pop(next(iter(self._recent)))
        return self._recent[ours]

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def _fused_type(types: dict, arch, ours: str) -> str:
    """A matrix fused on load (a chatglm file's separate q, k, v): the type its parts share
    (_uniform_parts made them share one)."""
    stem = arch.names.their_name(ours).replace("attn_qkv", "attn_q")
    return types[stem]


def _uniform_parts(file, arch, rows: dict, types: dict) -> None:
    """q, k and v that the arch fuses on load (chatglm's, from transformers' glm) are joined as rows of
    bytes, which needs one type: where a file gives them different ones (a Q4_K_M file's Q6_K v), the
    three are dequantized to F32 rows first (and then kept as int8), in place in `rows` and `types`."""
    if arch.prepare is not gguf_format.fuse_qkv:
        return
    for name in list(rows):
        if ".attn_q." in name:
            parts = [name.replace(".attn_q.", f".attn_{p}.") for p in "qkv"]
            if all(p in rows for p in parts) and len({types[p] for p in parts}) > 1:
                for p in parts:
                    rows[p] = file.dequantized(p).view(torch.uint8)
                    types[p] = "F32"


def _parts(name: str, model) -> list[str]:
    short = name.rsplit(".", 1)[-1]
    prefix = name[: -len(short)]
    if short == "qkv" and not model.config.fused_qkv:
        return [f"{prefix}{p}.weight" for p in "qkv"]
    if short == "gate_up" and not model.config.fused_gate_up:
        return [f"{prefix}{p}.weight" for p in ("gate", "up")]
    return [f"{name}.weight"]


def _bias(name: str, parts: list[str], floats: dict) -> torch.Tensor | None:
    biases = [floats.get(p.removesuffix("weight") + "bias") for p in parts]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        raise LmzooError(f"{name}: some of its parts have a bias and some do not")
    return torch.cat(biases)


def _assign(model, name: str, value) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, value)
