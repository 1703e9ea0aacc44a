"""What a config implies, and how configs differ: the engine behind `lmzoo diff`, `lmzoo families`,
`lmzoo diagram` and the derived numbers of `lmzoo info`.

Everything here is computed from Config alone, never from weights, so a 70B checkpoint compares
as fast as a preset (only its config.json or GGUF header is read). The parameter counts follow
the modules model.py builds; tests/test_compare.py checks them against the real module, built
on the meta device, for every preset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ..config import Config, field_names
from ..errors import LmzooError
from ..families import CLASSIC, PRESETS, preset
from ..nn.masks import build_mask

FORMATS = ("text", "markdown", "json")
# The FLOPs column is for a token that sees this many tokens: GPT-3's context, and the n_ctx of
# Kaplan et al.'s FLOPs formula, so numbers compare across models of any context length.
FLOPS_CONTEXT = 2048

ROPE_FIELDS = tuple(f for f in field_names() if f.startswith("rope_"))
# Fields that set a model's size rather than its architecture.
SIZE_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "head_dim", "d_ff", "max_seq_len")
LLAMA3_FIELDS = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


# ----------------------------------------------------------------------------- sources
def load_config(source: str | os.PathLike) -> Config:
    """A preset's Config, or a checkpoint's read from its config.json or GGUF header only."""
    source = os.fspath(source)
    if os.path.isdir(source):
        from ..formats import hf, registry

        return registry.config_from_hf(hf.read_config_json(source), os.path.join(source, "config.json"))[0]
    if os.path.isfile(source) and source.endswith(".gguf"):
        from ..formats.gguf import config_from_gguf
        from ..formats.gguf_file import read_gguf

        file = read_gguf(source, load_tensors=["rope_freqs.weight"])  # the header, and Llama 3's rotary factors
        return config_from_gguf(file.metadata, file.shapes.keys(), source, file.tensors.get("rope_freqs.weight"))
    if os.path.exists(source):
        raise LmzooError(f"{source}: expected a preset name, a Hugging Face model directory or a .gguf file")
    if os.sep in source or source.endswith(".gguf"):
        raise LmzooError(f"{source}: no such file or directory")
    return preset(source)  # an unknown name raises with the closest preset names


def label_of(source: str | os.PathLike) -> str:
    """How a source is named in tables: a preset by its name, a checkpoint by its file name."""
    return os.path.basename(os.path.normpath(os.fspath(source))) or os.fspath(source)


# ----------------------------------------------------------------------------- field differences
def values(c: Config) -> dict:
    """Field values as the model reads them: n_kv_heads/head_dim=None spelled out, so a checkpoint
    that writes 32 kv heads and a preset that leaves them None are not told apart."""
    out = c.to_dict()
    del out["family"]  # a display name, not an architectural choice
    out.update(n_kv_heads=c.kv_heads, head_dim=c.head_size)
    return out


def inert_fields(c: Config) -> set[str]:
    """Fields that change nothing given the others (the rotary base of learned positions, the
    top-k of a dense MLP...): a difference only there is no difference at all."""
    inert: set[str] = set()
    if not c.positions.startswith("rope"):
        inert.update(ROPE_FIELDS)
    if c.rope_scaling != "llama3":
        inert.update(LLAMA3_FIELDS)
    if c.rope_scaling in (None, "ntk_alpha"):  # Qwen1's NTK alpha follows the length, not a factor
        inert.add("rope_factor")
    if c.norm == "rmsnorm":
        inert.add("norm_bias")
    if c.norm_position != "deepnorm":
        inert.add("residual_scale")
    if c.attention_pattern == "dense":
        inert.update(("sparse_block", "sparse_summary", "sparse_layers"))
    elif c.attention_pattern != "fixed":
        inert.add("sparse_summary")
    if not c.n_experts:
        inert.add("experts_per_token")
    if c.mlp != "swiglu":
        inert.add("fused_gate_up")
    if c.lm_type == "causal":
        inert.add("span_start_token")
    return inert


def _same_key(value):
    """Floats compared to 6 significant digits: GGUF stores norm_eps as float32 (1e-5 reads back
    as 9.9999997e-06), which is the same model, not a difference."""
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def differing_fields(configs: list[Config]) -> list[str]:
    """Fields, in Config order, whose values are not all equal and that matter in at least one config."""
    vals = [values(c) for c in configs]
    inert = [inert_fields(c) for c in configs]
    return [f for f in vals[0]
            if len({_same_key(v[f]) for v in vals}) > 1 and not all(f in i for i in inert)]


def format_value(value) -> str:
    """A field value for a table: '-' for None, floats to 7 digits (float32 noise hidden)."""
    if value is None:
        return "-"
    if isinstance(value, float) and value != int(value):
        return f"{value:.7g}"
    return str(value)


def classic_of_size(c: Config) -> Config:
    """The classic decoder with `c`'s sizes: what `c` is compared with when sizes are set aside
    (so 32 query heads with 32 kv heads is MHA, no difference, while 8 kv heads is GQA)."""
    return CLASSIC.replace(**{f: getattr(c, f) for f in SIZE_FIELDS})


def architecture_fields(c: Config) -> list[str]:
    """The fields in which `c` differs from the classic decoder, sizes aside."""
    return differing_fields([classic_of_size(c), c])


def shown_value(c: Config, name: str) -> str:
    """A field's value for a table: 'n/a' where it changes nothing, '-' for None."""
    if name in inert_fields(c):
        return "n/a"
    return format_value(values(c)[name])


# ----------------------------------------------------------------------------- derived numbers
@dataclass(frozen=True)
class Derived:
    total_parameters: int
    active_parameters: int  # per token: a MoE token runs experts_per_token of n_experts experts
    flops_per_token: int  # forward pass of one token that sees `flops_context` tokens
    flops_context: int
    kv_cache_bytes_per_token: int  # keys and values of every layer at fp16
    max_seq_len: int  # trained context
    max_context: int  # longest accepted (Qwen1's dynamic NTK goes past the trained context)


def _norm_size(c: Config) -> int:
    return c.d_model * (2 if c.norm == "layernorm" and c.norm_bias else 1)


def _attention_weights(c: Config) -> int:
    q, kv = c.n_heads * c.head_size, c.kv_heads * c.head_size
    return c.d_model * (q + 2 * kv) + q * c.d_model  # q, k, v (fused or not) and o


def _mlp_weights(c: Config) -> int:
    return (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff  # gate (or gate|up), up, down


def parameters(c: Config) -> tuple[int, int]:
    """(total, active per token), counted as model.py builds the modules (a tied head once)."""
    q, kv = c.n_heads * c.head_size, c.kv_heads * c.head_size
    attention = _attention_weights(c) + (q + 2 * kv) * c.qkv_bias + c.d_model * c.o_bias
    mlp_bias = ((2 if c.mlp == "swiglu" else 1) * c.d_ff + c.d_model) * c.mlp_bias
    expert = _mlp_weights(c) + mlp_bias
    norms = (2 + 2 * c.post_sublayer_norm) * _norm_size(c)
    shared = attention + norms + c.d_model * c.n_experts  # the router, when there are experts
    total_layer = shared + max(c.n_experts, 1) * expert
    active_layer = shared + (c.experts_per_token if c.n_experts else 1) * expert
    outside = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    outside += c.max_seq_len * c.d_model * (c.positions == "learned") + _norm_size(c) * c.final_norm
    return c.n_layers * total_layer + outside, c.n_layers * active_layer + outside


def keys_seen(c: Config, context: int) -> int:
    """How many keys the last token of a `context`-long sequence attends to, summed over the
    layers, counted from the model's own mask builder (sliding windows, where the layer has one,
    and GPT-3's sparse patterns included)."""
    last = torch.tensor([context - 1])

    def count(pattern: str, window: int | None) -> int:
        return int(build_mask(last, context, window=window, pattern=pattern, block=c.sparse_block,
                              summary=c.sparse_summary).sum())

    return sum(count(c.attention_pattern if c.is_sparse_layer(i) else "dense",
                     c.sliding_window if c.is_window_layer(i) else None) for i in range(c.n_layers))


def flops_per_token(c: Config, context: int = FLOPS_CONTEXT) -> int:
    """Forward FLOPs of one token seeing `context` tokens (clipped to the model's context): 2 per
    multiply-add of every weight it meets (the head, tied or not; not the embedding lookup, a
    gather), plus q.k and softmax.v over the keys its mask lets it see. Biases, norms, rotary,
    activations and the softmax itself are left out: well under 1% for these models."""
    context = min(context, c.context_limit)
    used = c.experts_per_token if c.n_experts else 1
    weights = c.n_layers * (_attention_weights(c) + used * _mlp_weights(c) + c.d_model * c.n_experts)
    weights += c.d_model * c.vocab_size
    return 2 * weights + 2 * 2 * c.n_heads * c.head_size * keys_seen(c, context)


def kv_cache_bytes_per_token(c: Config, bytes_per_value: int = 2) -> int:
    """Each token leaves a key and a value of n_kv_heads * head_dim numbers in every layer."""
    return 2 * c.n_layers * c.kv_heads * c.head_size * bytes_per_value


def derived(c: Config, context: int = FLOPS_CONTEXT) -> Derived:
    total, active = parameters(c)
    return Derived(total, active, flops_per_token(c, context), min(context, c.context_limit),
                   kv_cache_bytes_per_token(c), c.max_seq_len, c.context_limit)


# ----------------------------------------------------------------------------- number formats
PARAM_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
FLOP_UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def human(n: float, units=PARAM_UNITS) -> str:
    """1234567 -> '1.23M' (parameters); FLOPs pass their own units (G, not B)."""
    for unit, size in units:
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def human_tokens(n: int) -> str:
    """4096 -> '4K', 131072 -> '128K': contexts are powers of two, counted in Ki."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def derived_rows(ds: list[Derived]) -> list[tuple[str, list[str]]]:
    """The derived numbers as (label, one string per model), for the text and markdown tables."""
    return [
        ("total parameters", [human(d.total_parameters) for d in ds]),
        ("active parameters / token", [human(d.active_parameters) for d in ds]),
        ("FLOPs / token (forward @ context)",
         [f"{human(d.flops_per_token, FLOP_UNITS)} @{human_tokens(d.flops_context)}" for d in ds]),
        ("KV cache / token (fp16)", [human_bytes(d.kv_cache_bytes_per_token) for d in ds]),
        ("max context", [f"{d.max_seq_len:,}" + (f" ({d.max_context:,})" if d.max_context != d.max_seq_len else "")
                         for d in ds]),
    ]


# ----------------------------------------------------------------------------- tables
def table(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """A plain aligned table, or a markdown one ('|' inside cells escaped)."""
    if fmt == "markdown":
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
        return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise LmzooError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def diff_report(sources: list[str], fmt: str = "text", context: int = FLOPS_CONTEXT) -> str:
    """`lmzoo diff`: the differing fields side by side with their documentation, then the numbers."""
    check_format(fmt)
    if len(sources) < 2:
        raise LmzooError("lmzoo diff needs at least two models to compare (presets or checkpoints)")
    if context < 1:
        raise LmzooError(f"--context {context}: must be >= 1")
    configs = [load_config(s) for s in sources]
    labels = [label_of(s) for s in sources]
    fields = differing_fields(configs)
    ds = [derived(c, context) for c in configs]
    if fmt == "json":
        return json.dumps({
            "models": [{"source": os.fspath(s), "family": c.family} for s, c in zip(sources, configs, strict=True)],
            "fields": [{"name": f, "doc": Config.explain(f), "values": [values(c)[f] for c in configs],
                        "applies": [f not in inert_fields(c) for c in configs]} for f in fields],
            "derived": [asdict(d) for d in ds],
        }, indent=2)
    header = ["field", *labels, "meaning"]
    rows = [[f, *(shown_value(c, f) for c in configs), Config.explain(f)] for f in fields]
    if not rows:
        rows = [["(no field differs)", *([""] * len(configs)), ""]]
    numbers = [[label, *cells] for label, cells in derived_rows(ds)]
    fam = [["family", *(c.family for c in configs), Config.explain("family")]]
    return (table(header, fam + rows, fmt) + "\n\n" + table(["derived", *labels], numbers, fmt)
            + ("\n\nn/a: the field changes nothing in that model." if any("n/a" in r for r in rows) else ""))


# ----------------------------------------------------------------------------- families table
FAMILY_COLUMNS = ("preset", "family", "parameters", "context", "heads / kv", "norm", "positions", "MLP",
                  "biases", "fused", "attention", "LM")


def _theta(base: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if base >= size:
            return f"{base / size:g}{unit}"
    return f"{base:g}"


def describe_positions(c: Config) -> str:
    if c.positions == "learned":
        return "learned"
    if c.positions == "none":
        return "none"
    parts = ["2-D RoPE" if c.positions == "rope_2d" else "RoPE", f"θ={_theta(c.rope_base)}"]
    if c.rope_fraction != 1.0 and c.positions != "rope_2d":  # 2-D RoPE always splits the dims in two
        parts.append("half the dims" if c.rope_fraction == 0.5 else f"{c.rope_fraction:g} of the dims")
    if c.rope_pairing == "interleaved":
        parts.append("interleaved")
    if c.rope_scaling == "ntk_alpha":
        parts.append("dynamic NTK")
    elif c.rope_scaling is not None:
        parts.append(f"{c.rope_scaling} ×{c.rope_factor:g}")
    return " ".join(parts[:2]) + "".join(", " + p for p in parts[2:])


def describe_attention(c: Config) -> str:
    parts = ["dense"]
    if c.sliding_window is not None:
        parts = [f"sliding window {c.sliding_window}"
                 + (f" (layers {c.sliding_window_from}+)" if c.sliding_window_from else "")]
    if c.attention_pattern != "dense":
        layers = "all" if c.sparse_layers == "all" else f"{c.sparse_layers} layers"
        parts = [f"{parts[0]} + {c.attention_pattern} {c.sparse_block} ({layers})"]
    if c.logn_attention:
        parts.append("logn scaling")
    return ", ".join(parts)


def describe_mlp(c: Config) -> str:
    kind = "SwiGLU" if c.mlp == "swiglu" else {"gelu": "GELU", "gelu_tanh": "GELU (tanh)"}.get(c.activation, c.mlp)
    if c.mlp == "swiglu" and c.activation != "silu":
        kind = f"gated {c.activation}"
    return f"MoE {c.n_experts}× {kind}, top-{c.experts_per_token}" if c.n_experts else kind


def describe_heads(c: Config) -> str:
    kind = "MHA" if c.kv_heads == c.n_heads else "MQA" if c.kv_heads == 1 else "GQA"
    return f"{c.n_heads} / {c.kv_heads} {kind}"


def family_row(name: str, c: Config) -> dict:
    """One preset as plain values (the JSON form); `family_cells` renders it for the tables."""
    total, active = parameters(c)
    biases = [n for n, on in (("qkv", c.qkv_bias), ("o", c.o_bias), ("mlp", c.mlp_bias),
                              ("norm", c.norm == "layernorm" and c.norm_bias)) if on]
    fused = [n for n, on in (("qkv", c.fused_qkv), ("gate_up", c.fused_gate_up and c.mlp == "swiglu")) if on]
    position = {"pre": "pre", "post": "post", "deepnorm": f"DeepNorm α={c.residual_scale:.3g}"}[c.norm_position]
    if c.post_sublayer_norm:
        position += " + sandwich"
    if not c.final_norm:
        position += ", no final"
    return dict(preset=name, family=c.family, parameters=total, active_parameters=active,
                context=c.max_seq_len, max_context=c.context_limit, heads=c.n_heads, kv_heads=c.kv_heads,
                heads_text=describe_heads(c), norm=c.norm, norm_position=position,
                positions=describe_positions(c), mlp=describe_mlp(c), biases=biases, fused=fused,
                attention=describe_attention(c), lm=c.lm_type)


def family_cells(r: dict) -> list[str]:
    params = human(r["parameters"])
    if r["active_parameters"] != r["parameters"]:
        params += f" ({human(r['active_parameters'])} active)"
    context = human_tokens(r["context"])
    if r["max_context"] != r["context"]:
        context += f" ({human_tokens(r['max_context'])})"
    norm = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[r["norm"]] + ", " + r["norm_position"]
    return [r["preset"], r["family"], params, context, r["heads_text"], norm, r["positions"], r["mlp"],
            ", ".join(r["biases"]) or "-", ", ".join(r["fused"]) or "-", r["attention"], r["lm"]]


def families_report(fmt: str = "text") -> str:
    """`lmzoo families`: one row per preset. README.md's families table is its markdown output."""
    check_format(fmt)
    rows = [family_row(name, c) for name, c in PRESETS.items()]
    if fmt == "json":
        return json.dumps([{k: v for k, v in r.items() if k != "heads_text"} for r in rows], indent=2,
                          ensure_ascii=False)
    return table(list(FAMILY_COLUMNS), [family_cells(r) for r in rows], fmt)
