"""Adapter files as PEFT writes them: adapter_config.json + adapter_model.safetensors.

    save_adapter(model, "out/adapter")     # LoRA, P-tuning v2 or prompt tuning, atomically
    load_adapter(model, "out/adapter")     # recognises the adapter's kind and attaches it

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

from ..errors import LmzooError
from ..peft.lora import LoraConfig, add_lora, lora_modules
from ..peft.prefix import PrefixConfig, PromptConfig, add_virtual
from .atomic import atomic_dir
from .hf import read_json_in
from .names import transpose
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


def our_module(model, theirs: str, path: str) -> str:
    fmt = format_that_expresses(model.config)
    name, _ = fmt.names.ours(theirs + ".weight")
    if name is None:
        raise LmzooError(f"{path}: adapter module {theirs} does not exist in this {fmt.model_type} model "
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


ENCODER_FILE = "lmzoo_encoder.safetensors"  # the whole encoder (projection MLP included), for resuming

UNSUPPORTED_LORA_OPTIONS = {"use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                            "bias": "none"}


def save_adapter(model, out_dir: str, base_name: str | None = None) -> str:
    """Write the model's adapter (LoRA) in PEFT's format, atomically."""
    if getattr(model, "lora_config", None) is not None:
        return _save_lora(model, out_dir, base_name)
    if model.virtual is not None:
        return _save_virtual(model, out_dir, base_name)
    raise LmzooError("this model has no adapter to save (add one with add_lora or add_virtual first)")


def _save_virtual(model, out_dir, base_name):
    """PEFT's PREFIX_TUNING / PROMPT_TUNING / P_TUNING files, plus the whole encoder in
    lmzoo_encoder.safetensors: PEFT keeps only the encoder's output, which cannot resume training."""
    enc, c = model.virtual, model.config
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": enc.n_virtual, "num_transformer_submodules": 1,
              "num_layers": c.n_layers, "inference_mode": True, "base_model_name_or_path": base_name}
    if enc.kind == "prefix":
        config = {"peft_type": "PREFIX_TUNING", "token_dim": c.kv_heads * c.head_size,
                  "num_attention_heads": c.kv_heads, "prefix_projection": enc.cfg.projection,
                  "encoder_hidden_size": enc.cfg.encoder_hidden or c.d_model, **common}
    elif enc.cfg.reparam is None:
        config = {"peft_type": "PROMPT_TUNING", "token_dim": c.d_model, "num_attention_heads": c.n_heads,
                  "prompt_tuning_init": "RANDOM", **common}
    else:
        config = {"peft_type": "P_TUNING", "token_dim": c.d_model, "num_attention_heads": c.n_heads,
                  "encoder_reparameterization_type": enc.cfg.reparam.upper(),
                  "encoder_hidden_size": enc.cfg.encoder_hidden or c.d_model, **common}
    base = {**base_signature(model), "encoder": {k: v for k, v in vars(enc.cfg).items()}}
    out = write_adapter(out_dir, config, {"prompt_embeddings": enc.flat().detach()}, base,
                              extra={ENCODER_FILE: {k: v.detach() for k, v in enc.state_dict().items()}})
    return out


def _save_lora(model, out_dir, base_name):
    cfg = model.lora_config
    mods = lora_modules(model)
    common = {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
              "bias": "none", "task_type": "CAUSAL_LM", "inference_mode": True, "base_model_name_or_path": base_name}
    base = base_signature(model)
    tensors = {}
    if any(list(m.slices) != [""] for _, m in mods):
        for name, m in mods:
            for key in m.lora_A:
                tensors[f"{name}.lora_A.{key}"] = m.lora_A[key]
                tensors[f"{name}.lora_B.{key}"] = m.lora_B[key]
        config = {"peft_type": SLICED, "targets": list(cfg.targets or ()), **common,
                  "format": "lmzoo per-slice LoRA: keys are lmzoo module names + .lora_A/.lora_B.<slice>"}
        return write_adapter(out_dir, config, tensors, base)
    targets, fan_in_fan_out = set(), False
    for name, m in mods:
        path, transform = their_module(model, name)
        B = m.lora_B["all"]
        if transform is transpose:  # GPT's Conv1D: PEFT transposes the update itself
            fan_in_fan_out = True
        elif transform is not None:  # a row permutation of the weight applies to B's rows too
            B = transform(B, model.config)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A["all"]
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B
        targets.add(path.rsplit(".", 1)[-1])
    config = {"peft_type": "LORA", "target_modules": sorted(targets), "fan_in_fan_out": fan_in_fan_out,
              "init_lora_weights": True, "modules_to_save": None, **common}
    return write_adapter(out_dir, config, tensors, base)


def adapter_kind(path: str) -> str:
    return read_adapter_config(path).get("peft_type", "?")


def load_adapter(model, path: str) -> str:
    """Attach the adapter in `path` to `model`; returns its kind (peft_type)."""
    config = read_adapter_config(path)
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind not in ("LORA", SLICED, *VIRTUAL_KINDS):
        raise LmzooError(f"{path}: adapter type {kind!r} is not supported (supported: LORA, {SLICED}, "
                         f"{', '.join(VIRTUAL_KINDS)})")
    _check_sizes(model, config, kind, path)
    tensors, recorded_base = read_adapter_tensors(path)
    check_base(model, recorded_base, path)
    try:
        if kind == "LORA":
            _load_peft_lora(model, config, tensors, path)
        elif kind == SLICED:
            _load_sliced_lora(model, config, tensors, path)
        else:
            _load_virtual(model, config, tensors, recorded_base, path)
    except KeyError as e:
        raise LmzooError(f"{path}: adapter_config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type
        raise LmzooError(f"{path}: adapter_config.json has a field lmzoo cannot read ({type(e).__name__}: {e})") \
            from None
    return kind


def _check_sizes(model, config: dict, kind: str, path: str) -> None:
    """The numbers that size what is built, checked before anything is allocated."""
    c = model.config
    limits = {"r": (1, max(c.d_model, c.d_ff))} if kind in ("LORA", SLICED) else \
        {"num_virtual_tokens": (1, c.context_limit - 1)}
    for key, (low, high) in limits.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise LmzooError(f"{path}: adapter_config.json {key}={value!r} must be a whole number in {low}..{high} "
                             "for this model")
    dropout = config.get("lora_dropout", 0.0)
    if kind in ("LORA", SLICED) and (not isinstance(dropout, (int, float)) or not 0 <= dropout < 1):
        raise LmzooError(f"{path}: adapter_config.json lora_dropout={dropout!r} must be in [0, 1)")
    return kind


VIRTUAL_KINDS = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def _load_virtual(model, config, tensors, recorded_base, path):
    """lmzoo's own files restore the whole encoder; a PEFT file gives only its output, which
    becomes a plain embedding (text positions after the virtual tokens, PEFT's convention)."""
    from safetensors.torch import load_file

    P, c = int(config["num_virtual_tokens"]), model.config
    if config.get("num_transformer_submodules", 1) != 1:
        raise LmzooError(f"{path}: num_transformer_submodules must be 1 for a decoder-only model")
    saved = recorded_base.get("encoder")
    full = os.path.join(path, ENCODER_FILE)
    if config["peft_type"] == "PREFIX_TUNING":
        expect = {"num_layers": c.n_layers, "num_attention_heads": c.kv_heads, "token_dim": c.kv_heads * c.head_size}
        wrong = [f"{k}: adapter {config.get(k)} vs model {v}" for k, v in expect.items()
                 if config.get(k) not in (v, None)]
        if wrong:
            raise LmzooError(f"{path}: this prefix adapter was made for another base model ({'; '.join(wrong)})")
        cfg = PrefixConfig(**saved) if saved and os.path.isfile(full) else PrefixConfig(n_virtual=P)
    else:
        cfg = PromptConfig(**saved) if saved and os.path.isfile(full) else PromptConfig(n_virtual=P, init="random")
    encoder = add_virtual(model, cfg)
    if saved and os.path.isfile(full):
        state = load_file(full)
    else:
        state = {"embedding.weight": tensors["prompt_embeddings"]}
    own = encoder.state_dict()
    for name, value in state.items():
        if name not in own:
            raise LmzooError(f"{path}: unexpected encoder tensor {name}")
        _copy(own[name], value, name, path)


def _lora_config(config: dict, targets, path: str) -> LoraConfig:
    for key, default in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(key) not in (default, None):
            raise LmzooError(f"{path}: adapter_config.json {key}={config[key]!r} is not supported "
                             f"(lmzoo needs {default!r})")
    return LoraConfig(r=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                      dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(sorted(targets)),
                      rslora=bool(config.get("use_rslora", False)))


def _load_peft_lora(model, config, tensors, path):
    weights: dict[str, dict[str, object]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LmzooError(f"{path}: unexpected tensor {key} in a LoRA adapter")
        their_path, part = key[len(PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        weights.setdefault(our_module(model, their_path, path), {})[part] = (t, their_path)
    targets = {name.rsplit(".", 1)[-1] for name in weights}
    add_lora(model, _lora_config(config, targets, path))
    for ours, parts in weights.items():
        module = model.get_submodule(ours)
        (A, their_path), (B, _) = parts["lora_A"], parts["lora_B"]
        _, transform = their_module(model, ours)
        if transform is not None and transform is not transpose:
            B = _inverse_rows(model, ours, B)
        _copy(module.lora_A["all"], A, f"{their_path}.lora_A.weight", path)
        _copy(module.lora_B["all"], B, f"{their_path}.lora_B.weight", path)


def _inverse_rows(model, ours: str, B):
    fmt = format_that_expresses(model.config)
    theirs, _ = fmt.names.theirs(ours + ".weight")
    _, to_ours = fmt.names.ours(theirs)
    return to_ours(B, model.config)


def _load_sliced_lora(model, config, tensors, path):
    add_lora(model, _lora_config(config, config.get("targets") or (), path))
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        if key not in params:
            raise LmzooError(f"{path}: adapter tensor {key} does not exist in this model "
                             "(an adapter made for another base model?)")
        _copy(params[key], t, key, path)


def _copy(param, value, name: str, path: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise LmzooError(f"{path}: adapter tensor {name} has shape {list(value.shape)}, but this model needs "
                         f"{list(param.shape)} (an adapter made for another base model?)")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
