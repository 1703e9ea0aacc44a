"""Nested training state (optimizer, scheduler, random generators) as JSON plus safetensors.

torch.save would pickle it, and unpickling a file runs whatever code the file names: a
checkpoint someone hands you could take over the machine on `--resume`. Here the structure goes
to JSON and every tensor to a safetensors file, and reading them back runs nothing.

    write_state(state, "dir/trainer")   # dir/trainer.json + dir/trainer.safetensors
    state = read_state("dir/trainer")

JSON has no tuples and only string keys, so those are written as tagged objects:
{"__tuple__": [...]}, {"__items__": [[key, value], ...]} (a dict with a key that is not a
string), {"__tensor__": "name in the safetensors file"}.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..errors import LmzooError

_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


def write_state(state, stem: str) -> None:
    """Write `state` (dicts, lists, tuples, str, int, float, bool, None and tensors) as
    stem.json and stem.safetensors. Not atomic by itself: write into a temporary directory."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x, path: str):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in x):
                return {k: encode(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[encode(k, f"{path}.key{i}"), encode(v, f"{path}.{i}")]
                                  for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):  # JSON has no inf or nan
            return {"__float__": repr(x)}
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        raise LmzooError(f"{stem}: cannot store a {type(x).__name__} in a training state (at {path})")

    skeleton = encode(state, "state")
    save_file(tensors, stem + ".safetensors")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(skeleton, f)


def read_state(stem: str):
    """The state write_state wrote; a missing, truncated or altered pair of files is an
    LmzooError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for suffix in (".json", ".safetensors"):
        if not os.path.isfile(stem + suffix):
            raise LmzooError(f"{stem}{suffix} is missing")
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            skeleton = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmzooError(f"{stem}.json: cannot read the training state: {e}") from None
    try:
        tensors = load_file(stem + ".safetensors")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmzooError(f"{stem}.safetensors: cannot read the training state (truncated or corrupt?): {e}") \
            from None

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1 and next(iter(x)) in _TAGS:
            (tag, value), = x.items()
            if tag == "__tensor__":
                if not isinstance(value, str) or value not in tensors:
                    raise LmzooError(f"{stem}.json names a tensor {value!r} that {stem}.safetensors lacks")
                return tensors[value]
            if tag == "__float__":
                if value not in ("inf", "-inf", "nan"):
                    raise LmzooError(f"{stem}.json: {value!r} is not a special float")
                return float(value)
            if not isinstance(value, list):
                raise LmzooError(f"{stem}.json: {tag} must hold a list")
            if tag == "__tuple__":
                return tuple(decode(v) for v in value)
            if not all(isinstance(p, list) and len(p) == 2 for p in value):
                raise LmzooError(f"{stem}.json: __items__ must hold [key, value] pairs")
            return {_hashable(decode(k), stem): decode(v) for k, v in value}
        return {k: decode(v) for k, v in x.items()}

    return decode(skeleton)


def _hashable(key, stem: str):
    try:
        hash(key)
    except TypeError:
        raise LmzooError(f"{stem}.json: a dictionary key of type {type(key).__name__} cannot be a key") from None
    return key
