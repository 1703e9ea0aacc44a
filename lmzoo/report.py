"""What `lmzoo info` shows: how a config differs from the classic decoder, and where its
parameters live."""

from __future__ import annotations

from collections import Counter

from .config import Config
from .families import CLASSIC, differences

# Fields that set a model's size rather than its architecture: shown apart from the diff.
SIZE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "head_dim", "d_ff", "max_seq_len")

COMPONENTS = (("tok_emb", "token embedding"), ("pos_emb", "position embedding"), ("attn_norm", "norms"),
              ("mlp_norm", "norms"), ("final_norm", "norms"), ("attn.", "attention"), ("mlp.", "mlp"),
              ("lm_head", "output head"))


def parameter_counts(model) -> dict[str, int]:
    """Parameters by component; a tied head counts once, under the embedding."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        component = next((label for key, label in COMPONENTS if key in name), "other")
        counts[component] += p.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)


def architecture_diff(config: Config, base: Config = CLASSIC) -> dict[str, tuple]:
    """The non-size fields in which `config` differs from `base`."""
    return {k: v for k, v in differences(config, base).items() if k not in SIZE_FIELDS}


def describe(config: Config, model=None, source: str = "") -> str:
    lines = [f"source:  {source}" if source else None, f"family:  {config.family}"]
    sizes = {k: getattr(config, k) for k in SIZE_FIELDS} | {"n_kv_heads": config.kv_heads, "head_dim": config.head_size}
    lines.append("size:    " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    diff = architecture_diff(config)
    lines.append(f"\nDifferences from the classic decoder ({len(diff)}):" if diff
                 else "\nIdentical to the classic decoder apart from its size.")
    width = max((len(k) for k in diff), default=0)
    for name, (_, value) in diff.items():
        lines.append(f"  {name:<{width}} = {value!r:<12} {Config.explain(name)}")
    if config.kv_heads != config.n_heads:
        kind = "MQA" if config.kv_heads == 1 else "GQA"
        lines.append(f"  ({kind}: {config.n_heads} query heads share {config.kv_heads} key/value heads)")
    if model is not None:
        counts = parameter_counts(model)
        total = counts.pop("total")
        lines.append("\nParameters:")
        for label, n in counts.items():
            lines.append(f"  {label:<20} {n:>16,}  {100 * n / total:5.1f}%")
        lines.append(f"  {'total':<20} {total:>16,}  ({human(total)})")
    return "\n".join(line for line in lines if line is not None)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
