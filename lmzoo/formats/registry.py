"""All Hugging Face formats lmzoo reads and writes, by model_type; recognising a checkpoint."""

from __future__ import annotations

from ..config import Config
from ..errors import LmzooError
from . import hf_glm, hf_glm1, hf_gpt, hf_llama, hf_qwen
from .hf import HFFormat

# GLM v1 comes before ChatGLM2: both say model_type 'chatglm', and each format's `matches` decides.
FAMILY_MODULES = [hf_llama, hf_gpt, hf_qwen, hf_glm1, hf_glm]

FORMATS: dict[str, list[HFFormat]] = {}
for _module in FAMILY_MODULES:
    for _fmt in _module.FORMATS:
        FORMATS.setdefault(_fmt.model_type, []).append(_fmt)


def config_from_hf(hf: dict, source: str) -> tuple[Config, HFFormat]:
    """Recognise the family from config.json and translate its fields."""
    if not isinstance(hf, dict):
        raise LmzooError(f"{source}: config.json must hold a JSON object, not a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise LmzooError(f"{source}: config.json's model_type must be a string, not {model_type!r}")
    if model_type is None:
        raise LmzooError(f"{source}: config.json has no model_type field")
    if model_type not in FORMATS:
        raise LmzooError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported model_types: {', '.join(FORMATS)}")
    fmt = next((f for f in FORMATS[model_type] if f.matches(hf)), FORMATS[model_type][0])
    try:
        fields = fmt.read_config(hf, source)
    except KeyError as e:
        raise LmzooError(f"{source}: config.json lacks the field {e.args[0]!r} needed for "
                         f"model_type {model_type!r}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a field of the wrong type or value
        raise LmzooError(f"{source}: config.json has a field lmzoo cannot read ({type(e).__name__}: {e})") from None
    try:
        return Config(**fields), fmt
    except LmzooError as e:
        raise LmzooError(f"{source}: {e}") from None


def format_that_expresses(c: Config) -> HFFormat:
    """The format whose config.json says everything this Config says (the family's own first)."""
    candidates = [f for fmts in FORMATS.values() for f in fmts]
    candidates.sort(key=lambda f: f.family != c.family)
    reasons = []
    for fmt in candidates:
        try:
            back = Config(**fmt.read_config(fmt.write_config(c)))
        except (LmzooError, KeyError, TypeError, ValueError) as e:
            reasons.append(f"{fmt.model_type}: {e}")
            continue
        if comparable(back) == comparable(c):
            return fmt
        lost = sorted(k for k, v in comparable(c).items() if comparable(back).get(k) != v)
        reasons.append(f"{fmt.model_type}: cannot say {', '.join(lost)}")
    own = [r for r in reasons if r.split(":")[0] in {f.model_type for f in candidates if f.family == c.family}]
    raise LmzooError(f"no Hugging Face format can express this {c.family} config"
                     + (f" ({'; '.join(own)})" if own else f" (supported model_types: {', '.join(FORMATS)})"))


def comparable(c: Config) -> dict:
    d = c.to_dict()
    for k in ("family", "init_std", "scaled_residual_init"):
        d.pop(k)
    d.update(head_dim=c.head_size, n_kv_heads=c.kv_heads)  # None means the derived value
    if c.sliding_window is None:  # nor does the first windowed layer without a window
        d.pop("sliding_window_from")
    if c.attention_pattern == "dense":  # the sparse knobs mean nothing without a sparse pattern
        for k in ("sparse_block", "sparse_summary", "sparse_layers"):
            d.pop(k)
    return d
