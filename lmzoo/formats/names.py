"""Parameter-name tables: a checkpoint format is data, not a function full of special cases.

A table maps a checkpoint's names to lmzoo's, with `{i}` standing for the layer number:
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q.weight"
`rename_in` and `rename_out` apply a table in either direction and report every name that
has no counterpart, so a wrong checkpoint fails loudly instead of loading half a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import LmzooError


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


class NameTable:
    def __init__(self, table: Mapping[str, str], ignore: Iterable[str] = ()):
        self.table = dict(table)
        self._to_ours = [(_compile(theirs), ours) for theirs, ours in self.table.items()]
        self._to_theirs = [(_compile(ours), theirs) for theirs, ours in self.table.items()]
        self._ignore = [_compile(p) for p in ignore]

    @staticmethod
    def _map(name: str, rules) -> str | None:
        for regex, target in rules:
            m = regex.match(name)
            if m:
                return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
        return None

    def ours(self, theirs: str) -> str | None:
        return self._map(theirs, self._to_ours)

    def theirs(self, ours: str) -> str | None:
        return self._map(ours, self._to_theirs)

    def ignored(self, theirs: str) -> bool:
        return any(r.match(theirs) for r in self._ignore)


def check_state_dict(shapes: Mapping[str, tuple], expected: Mapping[str, torch.Tensor], source: str,
                     theirs: Callable[[str], str], unknown: Iterable[str] = ()) -> None:
    """Every expected tensor present with the right shape, nothing extra.

    shapes: our name -> shape of what the checkpoint holds; unknown: checkpoint names the
    table does not know. Errors name tensors as the checkpoint does (`theirs`)."""
    missing = [theirs(k) for k in expected if k not in shapes]
    unexpected = list(unknown) + [theirs(k) for k in shapes if k not in expected]
    problems = []
    if missing:
        problems.append("missing tensors: " + _some(missing))
    if unexpected:
        problems.append("unexpected tensors: " + _some(unexpected))
    for k, shape in shapes.items():
        if k in expected and tuple(shape) != tuple(expected[k].shape):
            problems.append(f"tensor {theirs(k)} has shape {list(shape)}, expected {list(expected[k].shape)}")
    if problems:
        raise LmzooError(f"{source}: the weights do not match the config: " + "; ".join(problems[:6]))


def _some(names: list[str], n: int = 6) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
