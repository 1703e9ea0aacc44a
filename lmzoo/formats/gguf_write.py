"""Write a model as a GGUF file that llama.cpp, Ollama and LM Studio load.

What goes in is what llama.cpp's own converter writes for the same Hugging Face model: the
architecture's metadata keys (gguf.py), the vocabulary with its pre-tokenizer and the chat
template (Tokenizer.gguf_metadata), and the tensors in llama.cpp's names and layouts. The
quantization is gguf-py's, so the blocks are bit for bit what llama.cpp's tools produce.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import LmzooError
from ..nn.model import Decoder
from .atomic import atomic_file
from .gguf import arch_for, arch_metadata, extra_tensors, stack_experts, stacked_name
from .names import to_theirs

# --type -> ggml type of the weight matrices; "auto" keeps each matrix in the type it was read
# from a GGUF file (so a quantized model is written back bit for bit), F16 where there was none.
TYPES = {"auto": None, "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# general.file_type, llama.cpp's LlamaFileType, by the type most matrices have
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what gguf-py can write


def save_gguf(model: Decoder, path: str | os.PathLike, tokenizer=None, *, type: str = "auto",
              name: str | None = None) -> tuple[str, list[str]]:
    """Write `model` (and its tokenizer) to `path` atomically; returns (path, notes), the notes
    naming anything llama.cpp's architecture cannot hold (as its converter, it is dropped)."""
    import gguf

    from ..peft.lora import lora_modules

    if type not in TYPES:
        raise LmzooError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    if any(not m.merged for _, m in lora_modules(model)):
        raise LmzooError("this model has unmerged LoRA adapters: merge them first (`lmzoo merge`), "
                         "or write the adapter alone as a LoRA GGUF")
    arch, fmt, config, dropped = arch_for(model.config)
    # the vocabulary first: a tokenizer GGUF cannot hold is refused before minutes of quantizing
    vocabulary = ({"tokenizer.ggml.model": "none"} if tokenizer is None
                  else tokenizer.gguf_metadata(config.vocab_size))
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
             if ".lora_" not in k and not k.startswith("virtual.")}
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    read_as = getattr(model, "gguf_types", {})  # our name -> ggml type, for a model read from GGUF
    types = {stacked_name(arch.names.their_name(k)): TYPES[type] or read_as.get(k, "F16") for k in state}
    types["rope_freqs.weight"] = "F32"
    tensors = {**stack_experts(to_theirs(state, arch.names, config)), **extra_tensors(arch, config)}
    encoded = {n: _encode(t, n, types[n]) for n, t in tensors.items()}
    rewritten = sorted({t for t in types.values() if t not in QUANTIZABLE})
    if rewritten:  # --type auto on a K-quant file
        dropped.append(f"matrices read as {', '.join(rewritten)} are written as Q8_0 (gguf-py, which lmzoo "
                       "writes with, has no K-quant encoder)")
    matrix_types = [q.name for n, (_, q) in encoded.items() if tensors[n].ndim >= 2]
    metadata = {
        "general.type": "model",
        "general.name": name or _stem_of(path),
        **arch_metadata(arch, fmt, config),
        "general.file_type": FILE_TYPES.get(max(set(matrix_types), key=matrix_types.count), 1),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **vocabulary,
    }
    return write_gguf_file(path, arch.name, metadata, encoded), dropped


def _stem_of(path) -> str:
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def write_gguf_file(path, arch_name: str, metadata: dict, encoded: dict) -> str:
    """A GGUF file, atomically: metadata as Python values (typed by _add), tensors as
    name -> (numpy data, ggml type or None for a float array's own)."""
    import gguf

    path = os.path.abspath(os.fspath(path))
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        for key, value in metadata.items():
            if key != "general.architecture":  # the writer adds it
                _add(writer, key, value)
        for tensor_name, (data, qtype) in encoded.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def save_lora_gguf(model: Decoder, path: str | os.PathLike, *, type: str = "f32",
                   name: str | None = None) -> str:
    """Write the LoRA adapters attached to `model` as a llama.cpp LoRA GGUF (what its
    convert_lora_to_gguf.py writes), which `llama-cli --lora` applies to the base model's GGUF
    unmerged: `<base tensor>.lora_a` [r, in] and `.lora_b` [out, r] per adapted matrix.

    llama.cpp scales each update by adapter.lora.alpha / r, with r read from lora_b. lmzoo's scale
    (alpha / r, or alpha / sqrt(r) for rsLoRA) and its per-slice adapters on fused matrices (q and
    v of one q|k|v: A stacked, B block-diagonal, rank 2r) are folded into B, so the update is
    the one lmzoo applies."""
    import gguf

    from ..peft.lora import lora_modules

    if type not in ("f32", "f16", "bf16", "q8_0"):
        raise LmzooError(f"a LoRA GGUF's type is one of f32, f16, bf16, q8_0 (llama.cpp's converter's); not {type!r}")
    modules = lora_modules(model)
    if not modules:
        raise LmzooError("this model has no LoRA adapter to write")
    if any(m.merged for _, m in modules):
        raise LmzooError("the LoRA adapters are merged into the weights; unmerge them first")
    arch, _, config, _ = arch_for(model.config)
    alpha = float(model.lora_config.alpha)
    a_parts, b_parts = {}, {}
    for module_name, m in modules:
        keys = [s or "all" for s in m.slices]
        A = torch.cat([m.lora_A[k].detach().float() for k in keys])
        r = m.lora_A[keys[0]].shape[0]
        B = torch.zeros(m.out_features, len(keys) * r)
        for i, (key, (start, rows)) in enumerate(zip(keys, m.slices.values(), strict=True)):
            B[start:start + rows, i * r:(i + 1) * r] = m.lora_B[key].detach().float()
        B *= m.scale * B.shape[1] / alpha  # llama.cpp multiplies by alpha / rank
        theirs, transform = arch.names.theirs(f"{module_name}.weight")
        if theirs is None:
            raise LmzooError(f"the LoRA on {module_name} has no llama.cpp tensor to adapt")
        a_parts[theirs] = A
        b_parts[theirs] = transform(B, config) if transform else B  # q/k rows permuted as the base's
    tensors = {**{f"{n}.lora_a": t for n, t in stack_experts(a_parts).items()},
               **{f"{n}.lora_b": t for n, t in stack_experts(b_parts).items()}}
    encoded = {n: _encode(t, n, TYPES[type]) for n, t in tensors.items()}
    metadata = {"general.type": "adapter", "general.name": name or _stem_of(path), "adapter.type": "lora",
                "adapter.lora.alpha": alpha, "general.quantization_version": gguf.GGML_QUANT_VERSION}
    return write_gguf_file(path, arch.name, metadata, encoded)


def _encode(t: torch.Tensor, name: str, type_name: str):
    """(numpy data, ggml type): matrices in the chosen type, vectors (norms, biases) in F32 as the
    converter does; a matrix whose rows do not split into whole blocks falls back to F16 (F32)."""
    import gguf

    array = t.contiguous().numpy()
    if type_name not in QUANTIZABLE:  # a K-quant read from a file: gguf-py cannot write those
        type_name = "Q8_0"
    if t.ndim < 2 or type_name == "F32":
        return array, gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if t.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array, qtype), qtype


def _add(writer, key: str, value) -> None:
    """Typed as llama.cpp's loader reads them: counts and ids uint32, reals float32."""
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        item = gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else \
            gguf.GGUFValueType.FLOAT32 if value and isinstance(value[0], float) else gguf.GGUFValueType.INT32
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=item)
    else:
        raise LmzooError(f"GGUF metadata {key} has a value of type {type(value).__name__}, which GGUF cannot hold")
