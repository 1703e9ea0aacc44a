"""Hugging Face model directories: config.json + (sharded) safetensors.

A supported model_type is an HFFormat: a name table plus the translation between its
config.json fields and lmzoo's Config. The families' formats live in hf_*.py beside this
file; registry.py gathers them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..errors import LmzooError
from .names import NameTable

ACTIVATION_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass
class HFFormat:
    model_type: str
    architecture: str
    names: NameTable
    read_config: Callable[..., dict]  # (config.json dict, source) -> Config fields, family included
    write_config: Callable[[Config], dict]  # Config -> config.json fields
    family: str = ""
    matches: Callable[[dict], bool] = lambda hf: True  # when several formats share a model_type
    extra_files: Callable[[Config], dict] | None = None  # remote-code formats: auto_map etc.


def activation(hf: dict, key: str, source: str, default: str = "silu") -> str:
    act = hf.get(key, default)
    if act not in ACTIVATION_NAMES:
        raise LmzooError(f"{source}: {key} {act!r} is not implemented; supported: {sorted(ACTIVATION_NAMES)}")
    return ACTIVATION_NAMES[act]


# ----------------------------------------------------------------------------- rotary fields
def read_rope(hf: dict, source: str) -> dict:
    """Both spellings: transformers 5's `rope_parameters`, and `rope_theta` + `rope_scaling`."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if fraction is not None:
        out["rope_fraction"] = float(fraction)
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "dynamic"):
        raise LmzooError(f"{source}: rope_type {kind!r} is not implemented; "
                         "lmzoo supports default, linear, llama3 and dynamic")
    out.update(rope_scaling=kind, rope_factor=float(params["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_seq_len=int(params["original_max_position_embeddings"]))
    return out


def write_rope(c: Config) -> dict:
    out: dict[str, Any] = {"rope_theta": c.rope_base}
    if c.rope_fraction != 1.0:
        out["partial_rotary_factor"] = c.rope_fraction
    if c.rope_scaling is not None:
        scaling: dict[str, Any] = {"rope_type": c.rope_scaling, "factor": c.rope_factor}
        if c.rope_scaling == "llama3":
            scaling.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                           original_max_position_embeddings=c.rope_original_max_seq_len)
        out["rope_scaling"] = scaling
    return out


# ----------------------------------------------------------------------------- files
def read_json_in(path: str, name: str, kind: str) -> dict:
    """`name` inside the directory `path`, parsed; errors say which file and what is wrong."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise LmzooError(f"{path}: not {kind} (no {name} in it)")
    return read_json_file(file)


def read_json_file(file: str) -> dict:
    """A JSON object from `file`; anything else (bad JSON or UTF-8, NaN, deep nesting, an array)
    is an LmzooError naming the file."""
    try:
        with open(file, encoding="utf-8-sig") as f:  # -sig: a leading BOM is allowed, as editors write it
            data = json.load(f, parse_constant=_no_nan)
    except OSError as e:
        raise LmzooError(f"{file}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise LmzooError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LmzooError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise LmzooError(f"{file}: JSON nested too deeply") from None
    except ValueError as e:
        raise LmzooError(f"{file}: {e}") from None
    if not isinstance(data, dict):
        raise LmzooError(f"{file}: must hold a JSON object, not a {type(data).__name__}")
    return data


def _no_nan(name: str):
    raise ValueError(f"{name} is not valid JSON (a number must be finite)")


def read_config_json(path: str) -> dict:
    return read_json_in(path, "config.json", "a Hugging Face model directory")


def safetensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise LmzooError(f"{index} names the shard {os.path.basename(f)}, which is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise LmzooError(f"{path}: no model.safetensors or model.safetensors.index.json "
                     "(only safetensors checkpoints are supported)")


def read_safetensors(files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LmzooError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def hf_config_json(c: Config, fmt: HFFormat, dtype: torch.dtype, bos_id=None, eos_id=None) -> dict:
    out = {
        "architectures": [fmt.architecture],
        "model_type": fmt.model_type,
        **fmt.write_config(c),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if fmt.extra_files is not None:
        out.update(fmt.extra_files(c))
    return out
