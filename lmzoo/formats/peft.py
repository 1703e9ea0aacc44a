"""Adapter files as PEFT writes them: adapter_config.json + adapter_model.safetensors.

LoRA keys are PEFT's: `base_model.model.<HF module path>.lora_A.weight` ([r, in]) and
`lora_B.weight` ([out, r]), where the HF module path comes from the family's name table, so
an adapter trained in lmzoo loads in peft on the transformers model and back.

A per-slice LoRA on a fused projection (q, k, v on one qkv matrix) has no PEFT equivalent.
It is saved in lmzoo's own format: the same two files, with peft_type "LMZOO_SLICED_LORA" (so
peft refuses it rather than misreading it) and keys `<lmzoo module>.lora_A.<slice>` /
`.lora_B.<slice>` in lmzoo's names.
"""

from __future__ import annotations

import json
import os

import torch

from ..atomic import atomic_dir
from ..errors import LmzooError
from .hf import read_json_in
from .names import transpose  # noqa: F401  (the adapters ask whether a transform is this one)
from .registry import format_that_expresses

PREFIX = "base_model.model."
SLICED = "LMZOO_SLICED_LORA"


def read_adapter_config(path: str) -> dict:
    return read_json_in(path, "adapter_config.json", "an adapter directory")


def read_adapter_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the base-model signature lmzoo recorded in the file's metadata, or {})."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise LmzooError(f"{path}: no adapter_model.safetensors")
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
        return load_file(file), json.loads(meta.get("lmzoo_base", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmzooError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def write_adapter(out_dir: str, config: dict, tensors: dict[str, torch.Tensor], base: dict | None = None,
                  extra: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """The two files (and any `extra` safetensors files), atomically; lmzoo's record of the
    base model goes in the safetensors metadata, where peft does not look."""
    from safetensors.torch import save_file

    meta = {"format": "pt", "lmzoo_base": json.dumps(base or {})}
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata=meta)
        for name, more in (extra or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in more.items()}, os.path.join(tmp, name))
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return os.path.abspath(out_dir)


def their_module(model, ours: str):
    """(HF module path, transform) of one of our linear modules, e.g. blocks.0.attn.q ->
    model.layers.0.self_attn.q_proj, via the family's name table."""
    fmt = format_that_expresses(model.config)
    name, transform = fmt.names.theirs(ours + ".weight")
    if name is None:
        raise LmzooError(f"{ours} has no name in the {fmt.model_type} checkpoint format")
    return name.removesuffix(".weight"), transform


def our_module(model, theirs: str) -> str:
    fmt = format_that_expresses(model.config)
    name, _ = fmt.names.ours(theirs + ".weight")
    if name is None:
        raise LmzooError(f"adapter module {theirs} does not exist in this {fmt.model_type} model "
                         "(an adapter made for another base model?)")
    return name.removesuffix(".weight")


def base_signature(model) -> dict:
    c = model.config
    return {"family": c.family, "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
            "n_kv_heads": c.kv_heads, "head_dim": c.head_size, "d_ff": c.d_ff, "vocab_size": c.vocab_size}


def check_base(model, recorded: dict, path: str) -> None:
    """Refuse an adapter whose recorded base model differs from this one, naming the fields."""
    if not recorded:
        return
    mine = base_signature(model)
    diff = [f"{k}: adapter {recorded[k]} vs model {mine[k]}" for k in mine if k in recorded and recorded[k] != mine[k]]
    if diff:
        raise LmzooError(f"{path}: this adapter was made for another base model ({'; '.join(diff)})")
