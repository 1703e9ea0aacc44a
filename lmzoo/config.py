"""Config: one documented field per architectural choice of the decoder.

The defaults describe the classic decoder of the source document (pre-norm RMSNorm, rotary
positions, SwiGLU MLP, no biases: Llama's block); a family is the set of fields it changes
(see families.py). `Config.explain(name)` returns a field's one-line documentation,
which `lmzoo info` prints next to each difference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import LmzooError

NORM_KINDS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "deepnorm")
POSITION_KINDS = ("learned", "rope", "rope_2d", "none")
ROPE_PAIRINGS = ("half", "interleaved")
ROPE_SCALINGS = (None, "linear", "llama3", "dynamic", "ntk_alpha")
MLP_KINDS = ("gelu", "swiglu")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
LM_TYPES = ("causal", "prefix")
ATTENTION_PATTERNS = ("dense", "banded", "strided", "fixed")
SPARSE_LAYERS = ("all", "odd", "even")


@dataclass(frozen=True)
class Config:
    """Every field is a difference some family makes to the classic decoder."""

    family: str = "custom"
    """Display name of the preset this config came from (never read by model code)."""

    # --- sizes -------------------------------------------------------------------------
    vocab_size: int = 32000
    """Number of rows of the token embedding and of the output head."""
    n_layers: int = 12
    """Number of decoder blocks."""
    d_model: int = 768
    """Width of the residual stream (hidden size)."""
    n_heads: int = 12
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads: = n_heads is MHA, fewer is GQA, 1 is MQA (None: = n_heads)."""
    head_dim: int | None = None
    """Width of one attention head (None: d_model // n_heads)."""
    d_ff: int = 3072
    """Hidden width of the MLP (per expert for MoE)."""
    max_seq_len: int = 2048
    """Context length: the most positions the model was trained for."""
    max_context: int | None = None
    """Longest sequence accepted when inference may run past max_seq_len (Qwen1's dynamic NTK)."""

    # --- normalisation -----------------------------------------------------------------
    norm: str = "rmsnorm"
    """Normalisation layer: 'layernorm' (mean and variance, with bias) or 'rmsnorm' (scale only)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance inside the norm."""
    norm_bias: bool = False
    """Whether LayerNorm has a learned bias (RMSNorm never has)."""
    norm_position: str = "pre"
    """'pre': x + f(norm(x)) (GPT-2 on); 'post': norm(x + f(x)) (GPT-1); 'deepnorm': h=norm(x); a*h + f(h) (GLM)."""
    residual_scale: float = 1.0
    """DeepNorm's alpha: the residual is scaled by it before the add (GLM v1: sqrt(2*n_layers))."""
    post_sublayer_norm: bool = False
    """One more norm on each sublayer's output before the residual add (GLM-4's sandwich norm)."""
    final_norm: bool = True
    """One more norm after the last block (GPT-2 added it; GPT-1 has none)."""

    # --- positions ---------------------------------------------------------------------
    positions: str = "rope"
    """'learned': absolute embedding (GPT); 'rope': rotary; 'rope_2d': GLM's position + block position."""
    rope_base: float = 10000.0
    """Rotary base theta: frequencies are base^(-2i/d)."""
    rope_fraction: float = 1.0
    """Fraction of each head's dims that rotate (ChatGLM rotates half, the rest pass through)."""
    rope_pairing: str = "half"
    """Which dims rotate together: 'half' pairs i with i+d/2 (HF Llama), 'interleaved' pairs 2i, 2i+1."""
    rope_scaling: str | None = None
    """Context extension of rotary frequencies: None, 'linear', 'llama3', 'dynamic' or 'ntk_alpha' (NTK)."""
    rope_factor: float = 1.0
    """Scaling factor for rope_scaling."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_len/low_freq_factor are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_len/high_freq_factor are kept as they are."""
    rope_original_max_seq_len: int = 8192
    """llama3 scaling: the context length the frequencies were trained for."""
    rope_fp16_frequencies: bool = False
    """Round the rotary frequencies to fp16, as ChatGLM-6B's code does (a ~1e-4 change in logits)."""

    # --- attention ---------------------------------------------------------------------
    qkv_bias: bool = False
    """Bias on the q, k and v projections (Qwen, ChatGLM, GPT)."""
    o_bias: bool = False
    """Bias on the attention output projection (GPT)."""
    fused_qkv: bool = False
    """One matrix computes q|k|v (Qwen1, ChatGLM, GPT-2's c_attn); otherwise three matrices."""
    logn_attention: bool = False
    """Past max_seq_len, queries are scaled by log(position)/log(max_seq_len) to keep attention sharp (Qwen1)."""
    sliding_window: int | None = None
    """Each token attends only to the last `sliding_window` positions, itself included (Mistral)."""
    sliding_window_from: int = 0
    """The first layer with the sliding window; the layers before it see every position (Qwen2's max_window_layers)."""
    lm_type: str = "causal"
    """'causal': each token sees only earlier ones; 'prefix': the prompt sees itself both ways."""
    span_start_token: bool = False
    """A prefix LM's prompt ends with a token that opens the generated span (GLM's <sop>), outside the prefix."""
    attention_pattern: str = "dense"
    """Sparse Transformer patterns (GPT-3): 'dense', 'banded' (local band), 'strided' or 'fixed'."""
    sparse_block: int = 128
    """Band width of 'banded', stride of 'strided', block length of 'fixed'."""
    sparse_summary: int = 8
    """'fixed': the last sparse_summary positions of each block are visible to all later tokens."""
    sparse_layers: str = "odd"
    """Which layers use attention_pattern: 'all', 'odd' or 'even' (GPT-3 alternates dense and sparse)."""

    # --- MLP ---------------------------------------------------------------------------
    mlp: str = "swiglu"
    """'gelu': down(act(up(x))); 'swiglu': down(act(gate(x)) * up(x)) (Llama and later)."""
    activation: str = "silu"
    """Activation inside the MLP: 'gelu', 'gelu_tanh' (GPT), 'silu' (SwiGLU), 'relu'."""
    mlp_bias: bool = False
    """Bias on the MLP projections (GPT)."""
    fused_gate_up: bool = False
    """One matrix computes gate|up (ChatGLM's dense_h_to_4h); otherwise two matrices."""
    n_experts: int = 0
    """Mixture of experts: that many MLPs per block and a router (0: one dense MLP)."""
    experts_per_token: int = 2
    """MoE: each token goes to the top-k experts of the router's softmax, their weights renormalised."""

    # --- embeddings and init -----------------------------------------------------------
    tie_embeddings: bool = False
    """The output head reuses the token embedding matrix."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weights."""
    scaled_residual_init: bool = False
    """GPT-2 scales residual projections' init by 1/sqrt(2*n_layers), keeping the residual sum's variance."""

    # -----------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def context_limit(self) -> int:
        return self.max_context or self.max_seq_len

    @property
    def rope_dims(self) -> int:
        """Number of dims per head that rotate (always even)."""
        return int(self.head_size * self.rope_fraction) // 2 * 2

    def is_window_layer(self, layer: int) -> bool:
        """Whether `layer` attends through sliding_window (the others see every position)."""
        return self.sliding_window is not None and layer >= self.sliding_window_from

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether `layer` uses attention_pattern (the others are dense)."""
        if self.attention_pattern == "dense":
            return False
        return self.sparse_layers == "all" or (layer % 2 == 1) == (self.sparse_layers == "odd")

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed: the way every preset is written as a diff."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise LmzooError(f"Config has no field(s) {sorted(unknown)}; fields: {field_names()}")
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def explain(name: str) -> str:
        return FIELD_DOCS.get(name, "")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


# Sizes that must be positive integers, and numbers that must be positive and finite.
_POSITIVE_INTS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
                  "max_context", "sliding_window", "sparse_block", "sparse_summary", "experts_per_token",
                  "rope_original_max_seq_len")
_POSITIVE_FLOATS = ("rope_base", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "residual_scale")


def _check_types(c: Config) -> None:
    """Every field has its annotated type (a config.json can hold anything), before any arithmetic."""
    for f in dataclasses.fields(c):
        value, kinds = getattr(c, f.name), f.type.replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        ok = (("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
              or ("float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
              or ("bool" in kinds and isinstance(value, bool))
              or ("str" in kinds and isinstance(value, str)))
        if not ok:
            raise LmzooError(f"Config.{f.name}={value!r} is not of type {f.type}")
    for name in _POSITIVE_INTS:
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise LmzooError(f"Config.{name}={getattr(c, name)} must be >= 1")
    for name in _POSITIVE_FLOATS:
        if getattr(c, name) <= 0:
            raise LmzooError(f"Config.{name}={getattr(c, name)} must be > 0")
    for name in ("norm_eps", "init_std", "n_experts", "sliding_window_from"):
        if getattr(c, name) < 0:
            raise LmzooError(f"Config.{name}={getattr(c, name)} must be >= 0")


def _check(c: Config) -> None:
    _check_types(c)
    choices = {
        "norm": NORM_KINDS, "norm_position": NORM_POSITIONS, "positions": POSITION_KINDS,
        "rope_pairing": ROPE_PAIRINGS, "rope_scaling": ROPE_SCALINGS, "mlp": MLP_KINDS,
        "activation": ACTIVATIONS, "lm_type": LM_TYPES, "attention_pattern": ATTENTION_PATTERNS,
        "sparse_layers": SPARSE_LAYERS,
    }
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise LmzooError(f"Config.{name}={getattr(c, name)!r} is not one of {list(allowed)}")
    if c.n_heads % c.kv_heads:
        raise LmzooError(f"Config.n_heads={c.n_heads} must be a multiple of n_kv_heads={c.kv_heads}")
    if c.n_experts and not 0 < c.experts_per_token <= c.n_experts:
        raise LmzooError(f"Config.experts_per_token={c.experts_per_token} must be in 1..n_experts={c.n_experts}")
    if c.positions == "rope_2d" and c.rope_fraction != 0.5:
        raise LmzooError("Config.positions='rope_2d' rotates two halves of each head: set rope_fraction=0.5")
    if c.attention_pattern == "fixed" and not 0 < c.sparse_summary <= c.sparse_block:
        raise LmzooError(f"Config.sparse_summary={c.sparse_summary} must be in 1..sparse_block={c.sparse_block}")
    if not 0.0 < c.rope_fraction <= 1.0:
        raise LmzooError(f"Config.rope_fraction={c.rope_fraction} must be in (0, 1]")


def _field_docs() -> dict[str, str]:
    """Read each field's docstring (the string literal under it) from this module's source."""
    import ast
    import inspect
    import itertools

    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = nxt.value.value
    return docs


FIELD_DOCS: dict[str, str] = _field_docs()
