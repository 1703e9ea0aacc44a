"""Parameter-name tables: a checkpoint format is data, not a function full of special cases.

A table maps a checkpoint's names to lmzoo's, with `{i}` (layer) or `{e}` (expert) standing
for a number:
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q.weight"
Where the tensor itself must change too, the target is a `Mapped` with a small named
transform each way (transpose a Conv1D weight, un-permute rotary rows, ...).
`to_ours` and `to_theirs` apply a table and report every name without a counterpart, so a
wrong checkpoint fails loudly instead of loading half a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import LmzooError

Transform = Callable[[torch.Tensor, Config], torch.Tensor]


@dataclass(frozen=True)
class Mapped:
    """A target name plus the transforms from the checkpoint's layout to ours and back."""

    name: str
    to_ours: Transform
    to_theirs: Transform


def transpose(t: torch.Tensor, c: Config) -> torch.Tensor:
    """GPT's Conv1D stores [in, out]; nn.Linear wants [out, in]. Its own inverse."""
    return t.t().contiguous()


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for key in ("i", "e"):
        regex = regex.replace(re.escape("{" + key + "}"), rf"(?P<{key}>\d+)")
    return re.compile(regex + r"\Z")


def _fill(template: str, match: re.Match) -> str:
    for key, value in match.groupdict().items():
        template = template.replace("{" + key + "}", value)
    return template


class NameTable:
    def __init__(self, table: Mapping[str, str | Mapped], ignore: Iterable[str] = ()):
        self.table = dict(table)
        self._rules = []  # (their regex, our regex, their template, our template, mapped or None)
        for theirs, target in self.table.items():
            ours = target.name if isinstance(target, Mapped) else target
            mapped = target if isinstance(target, Mapped) else None
            self._rules.append((_compile(theirs), _compile(ours), theirs, ours, mapped))
        self._ignore = [_compile(p) for p in ignore]

    def ours(self, theirs: str):
        """(our name, transform or None) for a checkpoint name, or (None, None)."""
        for regex, _, _, ours, mapped in self._rules:
            m = regex.match(theirs)
            if m:
                return _fill(ours, m), (mapped.to_ours if mapped else None)
        return None, None

    def theirs(self, ours: str):
        """(checkpoint name, transform or None) for one of our names, or (None, None)."""
        for _, regex, theirs, _, mapped in self._rules:
            m = regex.match(ours)
            if m:
                return _fill(theirs, m), (mapped.to_theirs if mapped else None)
        return None, None

    def their_name(self, ours: str) -> str:
        return self.theirs(ours)[0] or ours

    def ignored(self, theirs: str) -> bool:
        return any(r.match(theirs) for r in self._ignore)


def to_ours(tensors: Mapping[str, torch.Tensor], table: NameTable, config: Config):
    """Rename (and transform) a checkpoint's tensors; returns (ours, unknown checkpoint names)."""
    ours, unknown = {}, []
    for name, t in tensors.items():
        if table.ignored(name):
            continue
        target, transform = table.ours(name)
        if target is None:
            unknown.append(name)
        else:
            ours[target] = transform(t, config) if transform else t
    return ours, unknown


def to_theirs(state: Mapping[str, torch.Tensor], table: NameTable, config: Config) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        target, transform = table.theirs(name)
        if target is None:
            raise LmzooError(f"tensor {name} has no name in this checkpoint format")
        out[target] = transform(t, config) if transform else t
    return out


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
