"""LoRA: freeze W, learn a low-rank update, y = W x + scale * B A x with scale = alpha / r.

One injection path for every family: a target names lmzoo modules by their short name (q, k,
v, o, gate, up, down, qkv, gate_up, lm_head, experts). On a fused projection a target may
also name a slice: `q` on a fused `qkv` gets its own A and B acting on the q rows only, as the
LoRA paper did for GPT-2's c_attn. The whole fused matrix is targeted as `qkv`, as PEFT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmzooError

LINEAR_NAMES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "lm_head", "router")
SLICE_NAMES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the config's default (default_targets)
    rslora: bool = False  # scale alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r
    init: str = "kaiming"  # or "gaussian"
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def default_targets(model) -> tuple[str, ...]:
    """q and v as in the LoRA paper; the whole fused matrix where q|k|v are fused (as PEFT)."""
    return ("qkv",) if model.config.fused_qkv else ("q", "v")


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias objects, so names and checkpoints do not change) plus
    low-rank updates, one per slice of its output rows (one slice covering all rows when not
    sliced)."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig, slices: dict[str, tuple[int, int]]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = cfg.scale
        self.slices = slices  # slice name -> (first row, number of rows); "" = the whole matrix
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (_, rows) in slices.items():
            key = name or "all"
            self.lora_A[key] = nn.Parameter(torch.empty(cfg.r, self.in_features, dtype=base.weight.dtype,
                                                        device=base.weight.device))
            self.lora_B[key] = nn.Parameter(torch.zeros(rows, cfg.r, dtype=base.weight.dtype,
                                                        device=base.weight.device))
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A[key], std=1 / cfg.r)
            else:  # PEFT's default: Kaiming-uniform A, zero B, so a fresh adapter changes nothing
                nn.init.kaiming_uniform_(self.lora_A[key], a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.dropout(x)
        if list(self.slices) == [""]:
            return y + self.scale * F.linear(F.linear(h, self.lora_A["all"]), self.lora_B["all"])
        update = torch.zeros_like(y)
        for name, (start, rows) in self.slices.items():
            update[..., start:start + rows] = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name])
        return y + self.scale * update

    def delta(self) -> torch.Tensor:
        """scale * B A laid out like the weight, computed in fp32."""
        d = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        for name, (start, rows) in self.slices.items():
            key = name or "all"
            d[start:start + rows] += self.lora_B[key].float() @ self.lora_A[key].float()
        return self.scale * d

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the weight (in fp32, then cast). Merging twice changes nothing."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def _slices_of(module_name: str, module: nn.Module, model, wanted: set[str]):
    """Which slices of this module the targets ask for: {"": whole} or {"q": (start, rows), ...}."""
    short = module_name.rsplit(".", 1)[-1]
    if short in wanted or ("experts" in wanted and ".experts." in module_name):
        return {"": (0, module.out_features)}
    if short in SLICE_NAMES:
        c = model.config
        if short == "qkv":
            q, kv = c.n_heads * c.head_size, c.kv_heads * c.head_size
            bounds = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        else:
            bounds = {"gate": (0, c.d_ff), "up": (c.d_ff, c.d_ff)}
        picked = {s: bounds[s] for s in SLICE_NAMES[short] if s in wanted}
        return picked or None
    return None


def available_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for fused, parts in SLICE_NAMES.items():
        if fused in names:
            names.update(parts)
    if any(".experts." in n for n, _ in model.named_modules()):
        names.add("experts")
    return sorted(names)


def add_lora(model, cfg: LoraConfig) -> list[str]:
    """Wrap the targeted linear layers of `model` in place; freeze everything else.
    Returns the wrapped module names."""
    targets = tuple(cfg.targets or default_targets(model))
    if cfg.r < 1:
        raise LmzooError(f"LoRA rank r={cfg.r} must be >= 1")
    wanted = set(targets)
    wrapped, matched = [], set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        slices = _slices_of(name, module, model, wanted)
        if not slices:
            continue
        matched.update(slices if list(slices) != [""] else {name.rsplit(".", 1)[-1]})
        if ".experts." in name:
            matched.add("experts")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, cfg, slices))
        wrapped.append(name)
    unknown = wanted - matched
    if unknown:
        raise LmzooError(f"LoRA target(s) {sorted(unknown)} match no layer of this model; "
                         f"available: {', '.join(available_names(model))}")
    if model.config.tie_embeddings and "lm_head" in wanted:
        raise LmzooError("lm_head is tied to the token embedding in this model; LoRA on it is not supported")
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    model.lora_config = cfg
    return wrapped


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def strip_lora(model) -> None:
    """Merge, then turn every LoRALinear back into a plain nn.Linear (for saving a base model)."""
    merge_lora(model)
    for name, m in lora_modules(model):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.lora_config = None


def trainable_report(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
