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
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
             if ".lora_" not in k and not k.startswith("virtual.")}
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    read_as = getattr(model, "gguf_types", {})  # our name -> ggml type, for a model read from GGUF
    types = {stacked_name(arch.names.their_name(k)): TYPES[type] or read_as.get(k, "F16") for k in state}
    types["rope_freqs.weight"] = "F32"
    tensors = {**stack_experts(to_theirs(state, arch.names, config)), **extra_tensors(arch, config)}
    encoded = {n: _encode(t, n, types[n]) for n, t in tensors.items()}
    matrix_types = [q.name for n, (_, q) in encoded.items() if tensors[n].ndim >= 2]
    metadata = {
        "general.type": "model",
        "general.name": name or os.path.splitext(os.path.basename(os.fspath(path)))[0],
        **arch_metadata(arch, fmt, config),
        "general.file_type": FILE_TYPES.get(max(set(matrix_types), key=matrix_types.count), 1),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **(tokenizer.gguf_metadata(config.vocab_size) if tokenizer is not None else {"tokenizer.ggml.model": "none"}),
    }
    path = os.path.abspath(os.fspath(path))
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        for key, value in metadata.items():
            if key != "general.architecture":  # the writer adds it
                _add(writer, key, value)
        for tensor_name, (data, qtype) in encoded.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path, dropped


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
