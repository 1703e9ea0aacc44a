"""What `lmzoo info` shows: how a config differs from the classic decoder, where its parameters
live, the numbers that follow from it, and, for a checkpoint, the nearest preset."""

from __future__ import annotations

from collections import Counter

from ..config import Config
from ..families import PRESETS
from .compare import (
    SIZE_FIELDS,
    architecture_fields,
    classic_of_size,
    derived,
    differing_fields,
    format_value,
    human_bytes,
    shown_value,
)
from .compare import human as human_3digits

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


def architecture_diff(config: Config) -> dict[str, tuple]:
    """The fields in which `config` differs from the classic decoder of its size: name -> (classic, config)."""
    base = classic_of_size(config)
    return {k: (getattr(base, k), getattr(config, k)) for k in architecture_fields(config)}


def nearest_preset(config: Config) -> tuple[str, list[str]]:
    """The preset closest to `config` and the fields that differ from it. Closest: fewest
    architecture differences (the attention kind, MHA/GQA/MQA, counts as one; kv head counts
    otherwise follow the size), then the same family, then fewest size differences."""
    def kind(c: Config) -> str:
        return "MHA" if c.kv_heads == c.n_heads else "MQA" if c.kv_heads == 1 else "GQA"

    def key(item):
        name, p = item
        fields = differing_fields([p, config])
        arch = [f for f in fields if f not in SIZE_FIELDS and f != "n_kv_heads"]
        return len(arch) + (kind(p) != kind(config)), p.family != config.family, len(fields)

    name, p = min(PRESETS.items(), key=key)
    return name, differing_fields([p, config])


def describe(config: Config, model=None, source: str = "") -> str:
    lines = [f"source:  {source}" if source else None, f"family:  {config.family}"]
    sizes = {k: getattr(config, k) for k in SIZE_FIELDS} | {"n_kv_heads": config.kv_heads, "head_dim": config.head_size}
    lines.append("size:    " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    diff = architecture_diff(config)
    lines.append(f"\nDifferences from the classic decoder ({len(diff)}):" if diff
                 else "\nIdentical to the classic decoder apart from its size.")
    width = max((len(k) for k in diff), default=0)
    for name, (_, value) in diff.items():
        lines.append(f"  {name:<{width}} = {format_value(value):<12} {Config.explain(name)}")
    if config.kv_heads != config.n_heads:
        kind = "MQA" if config.kv_heads == 1 else "GQA"
        lines.append(f"  ({kind}: {config.n_heads} query heads share {config.kv_heads} key/value heads)")
    lines += _nearest(config)
    if model is not None:
        counts = parameter_counts(model)
        total = counts.pop("total")
        lines.append("\nParameters:")
        for label, n in counts.items():
            lines.append(f"  {label:<20} {n:>16,}  {100 * n / total:5.1f}%")
        lines.append(f"  {'total':<20} {total:>16,}  ({human(total)})")
    lines += _derived(config)
    return "\n".join(line for line in lines if line is not None)


def _nearest(config: Config) -> list[str]:
    name, fields = nearest_preset(config)
    if not fields:
        return [f"\nSame config as the preset {name}."]
    p = PRESETS[name]
    lines = [f"\nNearest preset: {name}; this model differs from it in {len(fields)} field{'s' * (len(fields) > 1)}:"]
    rows = [(f, shown_value(p, f), shown_value(config, f)) for f in fields]
    w = [max(len(r[i]) for r in rows + [("field", name, "this model")]) for i in range(3)]
    lines.append(f"  {'field':<{w[0]}}  {name:<{w[1]}}  {'this model':<{w[2]}}  meaning")
    lines += [f"  {f:<{w[0]}}  {a:<{w[1]}}  {b:<{w[2]}}  {Config.explain(f)}" for f, a, b in rows]
    return lines


def _derived(config: Config) -> list[str]:
    d = derived(config)
    context = f"{d.max_seq_len:,}" + (f" ({d.max_context:,} past it)" if d.max_context != d.max_seq_len else "")
    return ["\nDerived:",
            f"  {'total parameters':<26} {d.total_parameters:>16,}  ({human_3digits(d.total_parameters)})",
            f"  {'active parameters / token':<26} {d.active_parameters:>16,}  ({human_3digits(d.active_parameters)})",
            f"  {'FLOPs / token (forward)':<26} {d.flops_per_token:>16,}  (at {d.flops_context:,} tokens of context)",
            f"  {'KV cache / token (fp16)':<26} {d.kv_cache_bytes_per_token:>16,}  bytes "
            f"({human_bytes(d.kv_cache_bytes_per_token)})",
            f"  {'max context':<26} {context:>16}"]


def info(source: str) -> str:
    """`lmzoo info` from the config alone (config.json or the GGUF header), the model built on the
    meta device to count its parameters: fast for any checkpoint size."""
    from ..formats.checkpoint import from_config
    from .compare import load_config

    config = load_config(source)
    label = f"preset {source}" if source.lower() in PRESETS else source
    return describe(config, from_config(config, device="meta"), source=label)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
