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
from ..nn.linear import Linear, g_w, linear, x_wt

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
        # The adapter trains in at least fp32 on a bf16 or fp16 base: tiny updates to a bf16
        # weight would round away, and AdamW's moments need the range.
        kw = dict(dtype=torch.promote_types(base.weight.dtype, torch.float32), device=base.weight.device)
        for name, (_, rows) in slices.items():
            key = name or "all"
            self.lora_A[key] = nn.Parameter(torch.empty(cfg.r, self.in_features, **kw))
            self.lora_B[key] = nn.Parameter(torch.zeros(rows, cfg.r, **kw))
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A[key], std=1 / cfg.r)
            else:  # PEFT's default: Kaiming-uniform A, zero B, so a fresh adapter changes nothing
                nn.init.kaiming_uniform_(self.lora_A[key], a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return linear(x, self.weight, self.bias)
        h = self.dropout(x)
        keys = [name or "all" for name in self.slices]
        As, Bs = [self.lora_A[k] for k in keys], [self.lora_B[k] for k in keys]
        if torch.is_autocast_enabled(x.device.type):  # autocast picks each op's dtype: let it
            return self.plain_forward(x, h, As, Bs)
        return LoRAFunction.apply(x, h, self.weight, self.bias, self.scale, list(self.slices.values()), *As, *Bs)

    def plain_forward(self, x, h, As, Bs):
        """The update with plain autograd ops: the reference LoRAFunction is tested against."""
        y = F.linear(x, self.weight, self.bias)
        update = torch.zeros_like(y)
        for (start, rows), A, B in zip(self.slices.values(), As, Bs, strict=True):
            update[..., start:start + rows] = F.linear(F.linear(h, A.to(h.dtype)), B.to(h.dtype))
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


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + b, plus scale * (h A^T) B^T added into each slice's rows (h: x after dropout).

    The same numbers as plain_forward, with less memory and time: the update is added into y
    in place (no full-size update tensors); only h and the rank-r products are saved (W is
    frozen, so its input is not needed); backward adds the A path's input gradient into the
    base one in place. The rank-r products are kept as [r, tokens] (A h^T, not h A^T): CPU
    BLAS makes an r-row output 2-5x faster than an r-column one. Adapters may be fp32 on a
    bf16 base: they are cast to the activations' dtype for the matmuls, and their gradients
    come back in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, scale, slices, *adapters):
        As, Bs = adapters[:len(slices)], adapters[len(slices):]
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        y = x_wt(x2, weight, bias)
        Ah = [A.to(h2.dtype) @ h2.t() for A in As]  # [r, tokens] each
        for (start, rows), a, B in zip(slices, Ah, Bs, strict=True):
            y[:, start:start + rows].addmm_(a.t(), B.to(y.dtype).t(), alpha=scale)
        ctx.scale, ctx.slices, ctx.same_h = scale, slices, h is x
        need_A = any(ctx.needs_input_grad[6:6 + len(slices)])
        ctx.save_for_backward(x2 if ctx.needs_input_grad[2] else None, h2 if need_A else None, weight, *As, *Bs, *Ah)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        n = len(ctx.slices)
        x2, h2, weight, *rest = ctx.saved_tensors
        As, Bs, Ah = rest[:n], rest[n:2 * n], rest[2 * n:]
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need_x, need_h, need_w, need_b = ctx.needs_input_grad[:4]
        need_A, need_B = ctx.needs_input_grad[6:6 + n], ctx.needs_input_grad[6 + n:]
        grad_x = g_w(g, weight.to(g.dtype)) if need_x else None
        grad_h = grad_x if ctx.same_h else (g.new_zeros(g.shape[0], As[0].shape[1]) if need_h else None)
        grad_A, grad_B = [], []
        for i, ((start, rows), A, B, a) in enumerate(zip(ctx.slices, As, Bs, Ah, strict=True)):
            gs = g[:, start:start + rows]
            grad_B.append((a @ gs).mul_(ctx.scale).t().to(B.dtype) if need_B[i] else None)
            ga = (B.to(g.dtype).t() @ gs.t()).mul_(ctx.scale)  # d loss / d (A h^T), [r, tokens]
            grad_A.append((ga @ h2).to(A.dtype) if need_A[i] else None)
            if grad_h is not None:
                grad_h.addmm_(ga.t(), A.to(ga.dtype))
        shape = grad_y.shape[:-1]
        return (None if grad_x is None else grad_x.view(*shape, -1),
                None if grad_h is None or ctx.same_h else grad_h.view(*shape, -1),
                g.t() @ x2 if need_w else None, g.sum(0) if need_b else None, None, None, *grad_A, *grad_B)


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
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.lora_config = None


def trainable_report(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
