"""`lmzoo diagram`: a model's decoder block drawn from its Config, with the boxes that differ from
the classic decoder (or from another model) highlighted.

Every box names the Config fields it depicts. A box is highlighted exactly when one of its fields
is among the differing fields of `lmzoo diff` (compare.differing_fields), so the picture and the
table cannot disagree. Without --vs the model is compared with the classic decoder of its own
size (compare.architecture_fields, as `lmzoo info` does): the classic decoder has no size of its
own. Drawn bottom-up like the Transformer paper.
"""

from __future__ import annotations

import itertools
import os
import textwrap
from dataclasses import dataclass, field

from ..config import Config
from ..errors import LmzooError
from .compare import ROPE_FIELDS, architecture_fields, differing_fields

# ----------------------------------------------------------------------------- which box shows which fields
# Together the boxes show every Config field (tests/test_diagram.py checks it), so any difference
# lights a box. max_seq_len belongs to the positions: the positions a model was trained on.
EMBED = frozenset({"vocab_size", "d_model"})
POSITIONS = frozenset({"positions", "max_seq_len", "max_context", *ROPE_FIELDS})
NORM = frozenset({"norm", "norm_eps", "norm_bias"})
BLOCK_NORM = NORM | {"norm_position"}
QKV = frozenset({"n_heads", "n_kv_heads", "head_dim", "fused_qkv", "qkv_bias"})
ATTENTION = frozenset({"lm_type", "span_start_token", "sliding_window", "sliding_window_from", "attention_pattern",
                       "sparse_block", "sparse_summary", "sparse_layers", "logn_attention"})
OUT = frozenset({"o_bias", "scaled_residual_init"})
ADD = frozenset({"norm_position", "residual_scale", "post_sublayer_norm"})
POST_NORM = NORM | {"post_sublayer_norm"}
MLP = frozenset({"mlp", "activation", "mlp_bias", "fused_gate_up", "d_ff", "n_experts", "experts_per_token",
                 "scaled_residual_init"})
BLOCKS = frozenset({"n_layers", "init_std"})
FINAL = NORM | {"final_norm"}
HEAD = frozenset({"vocab_size", "tie_embeddings"})

# ----------------------------------------------------------------------------- look
COLORS = {"embed": ("#ede7f6", "#5e35b1"), "norm": ("#fff8e1", "#a67c00"), "attn": ("#e3f2fd", "#1e63b5"),
          "pos": ("#fce4ec", "#ad1457"), "mlp": ("#e8f5e9", "#2e7d32"), "add": ("#ffffff", "#555555"),
          "tag": ("#eeeeee", "#757575")}
HIGHLIGHT = ("#ffd8a8", "#e8590c")  # face, edge
X0, X1, RAIL, NOTE_X, WIDTH = 1.7, 6.5, 0.95, 7.05, 10.0  # column, residual rail, notes (data units)
CX = (X0 + X1) / 2
GAP, PAD, LINE, SCALE = 0.36, 0.3, 0.23, 0.72  # arrow gap, frame padding, detail line, inches per unit


@dataclass
class Item:
    id: str
    title: str
    detail: list[str]  # phrases; a line break never splits one
    fields: frozenset
    color: str
    kind: str = "box"  # "box", "add" (a residual sum) or a frame marker "[" / "]"
    dashed: bool = False
    note: str = ""  # grey text beside an add

    @property
    def lines(self) -> list[str]:
        lines: list[str] = []
        for phrase in self.detail:
            if lines and len(lines[-1]) + 2 + len(phrase) <= 52:
                lines[-1] += ", " + phrase
            else:
                lines.append(phrase)
        return lines

    @property
    def height(self) -> float:
        return 0.44 if self.kind == "add" else 0.5 + LINE * len(self.lines)


# ----------------------------------------------------------------------------- what to draw
def _heads(c: Config) -> list[str]:
    kind = "MHA" if c.kv_heads == c.n_heads else "MQA" if c.kv_heads == 1 else "GQA"
    return [f"{c.n_heads} query heads", f"{c.kv_heads} key/value heads ({kind})", f"head_dim {c.head_size}"]


def _norm(c: Config, id: str, title: str, fields: frozenset, detail: list[str] | None = None) -> Item:
    kind = "RMSNorm" if c.norm == "rmsnorm" else "LayerNorm"
    bias = ["with bias"] if c.norm == "layernorm" and c.norm_bias else []
    return Item(id, title.format(norm=kind), detail or [f"eps {c.norm_eps:g}", *bias], fields, "norm")


def _positions(c: Config) -> Item:
    if c.positions == "learned":
        return Item("positions", "+ Learned position embedding", [f"{c.max_seq_len:,} positions × {c.d_model:,}"],
                    POSITIONS, "pos")
    if c.positions == "none":
        return Item("positions", "No position information", [], POSITIONS, "pos")
    if c.positions == "rope_2d":
        title, dims = "2-D rotary positions on q, k", ["half the dims turn by position", "half by block position"]
    else:
        title = "Rotary positions on q, k"
        share = {1.0: "all dims", 0.5: "half the dims"}.get(c.rope_fraction, f"{c.rope_fraction:g} of the dims")
        pairs = "pairs (2i, 2i+1)" if c.rope_pairing == "interleaved" else "pairs (i, i+d/2)"
        dims = [share, pairs]
    parts = [f"θ={c.rope_base:,.0f}" if c.rope_base == int(c.rope_base) else f"θ={c.rope_base:g}", *dims]
    if c.rope_scaling == "ntk_alpha":
        parts.append(f"dynamic NTK up to {c.context_limit:,}")
    elif c.rope_scaling is not None:
        parts.append(f"{c.rope_scaling} scaling ×{c.rope_factor:g}")
    if c.rope_fp16_frequencies:
        parts.append("fp16 frequencies")
    parts.append(f"trained on {c.max_seq_len:,} positions")
    return Item("positions", title, parts, POSITIONS, "pos")


def _attention(c: Config) -> Item:
    if c.lm_type == "prefix":
        title, parts = "Prefix-LM self-attention", ["the prompt sees itself both ways", "the rest is causal"]
        if c.span_start_token:
            parts.append("a span-start token opens the answer")
    else:
        title, parts = "Causal self-attention", ["each token sees the tokens before it"]
    if c.sliding_window is not None:
        parts.append(f"only the last {c.sliding_window:,}"
                     + (f" (layers {c.sliding_window_from}+)" if c.sliding_window_from else ""))
    if c.attention_pattern != "dense":
        parts.append(f"{c.sparse_layers} layers sparse: {c.attention_pattern}, block {c.sparse_block}"
                     + (f", {c.sparse_summary} summary" if c.attention_pattern == "fixed" else ""))
    if c.logn_attention:
        parts.append(f"logn query scaling past {c.max_seq_len:,}")
    return Item("attention", title, parts, ATTENTION, "attn")


def _mlp(c: Config) -> Item:
    act = "SwiGLU" if c.activation == "silu" else f"gated {c.activation}"
    if c.mlp == "swiglu":
        title, parts = f"{act} MLP", [f"down({c.activation}(gate x) * up x)"]
    else:
        title, parts = f"{c.activation.split('_')[0].upper()} MLP", [f"down({c.activation}(up x))"]
    parts.append(f"d_ff {c.d_ff:,}")
    if c.mlp == "swiglu" and c.fused_gate_up:
        parts.append("gate|up in one matrix")
    parts.append("with bias" if c.mlp_bias else "no bias")
    if c.n_experts:
        title = f"Mixture of {c.n_experts} {act} experts"
        parts.insert(0, f"a router sends each token to its top {c.experts_per_token}")
    if c.scaled_residual_init:
        parts.append("down init / √(2·n_layers)")
    return Item("mlp", title, parts, MLP, "mlp")


def _sublayer(c: Config, name: str, body: list[Item]) -> tuple[list[Item], tuple[str, str]]:
    """One residual sublayer in drawing order, and its residual (branch below this item, add id)."""
    norm = _norm(c, f"{name}_norm", "{norm}", BLOCK_NORM)
    post = [_norm(c, f"{name}_post_norm", "{norm} (sandwich)", POST_NORM, ["normalises the sublayer's output"])
            ] if c.post_sublayer_norm else []
    branch = "norm(f(·))" if c.post_sublayer_norm else "f(·)"  # GLM-4 normalises the output too
    notes = {"pre": f"x + {branch.replace('·', 'norm x')}", "post": f"norm(x + {branch.replace('·', 'x')})",
             "deepnorm": f"α·h + {branch.replace('·', 'h')}, α = {c.residual_scale:.3g}"}
    add = Item(f"{name}_add", "+", [], ADD, "add", kind="add", note=notes[c.norm_position])
    if c.norm_position == "post":  # GPT-1: the norm comes after the sum
        return [*body, *post, add, norm], (body[0].id, add.id)
    if c.norm_position == "deepnorm":  # GLM v1: the residual is the normed input h
        return [norm, *body, *post, add], (body[0].id, add.id)
    return [norm, *body, *post, add], (norm.id, add.id)


def plan(c: Config) -> tuple[list[Item], list[tuple[str, str]]]:
    """The items bottom-up (frame markers included) and the residual connections."""
    rope = c.positions.startswith("rope")
    qkv = Item("qkv", "Fused q|k|v projection" if c.fused_qkv else "q, k, v projections",
               [*_heads(c), "with bias" if c.qkv_bias else "no bias"], QKV, "attn")
    out = Item("o_proj", "Output projection o", ["with bias" if c.o_bias else "no bias"]
               + (["init / √(2·n_layers)"] if c.scaled_residual_init else []), OUT, "attn")
    attn, r1 = _sublayer(c, "attn", [qkv, *([_positions(c)] if rope else []), _attention(c), out])
    mlp, r2 = _sublayer(c, "mlp", [_mlp(c)])
    items = [Item("embedding", "Token embedding", [f"{c.vocab_size:,} tokens → d_model {c.d_model:,}"], EMBED,
                  "embed")]
    if not rope:
        items.append(_positions(c))
    items += [Item("blocks", f"× {c.n_layers} blocks", [], BLOCKS, "tag", kind="["), *attn, *mlp,
              Item("]", "", [], frozenset(), "tag", kind="]")]
    if c.final_norm:
        items.append(_norm(c, "final_norm", "Final {norm}", FINAL))
    else:
        items.append(Item("final_norm", "No final norm", [], frozenset({"final_norm"}), "norm", dashed=True))
    tie = ["tied to the token embedding"] if c.tie_embeddings else []
    items.append(Item("head", "Output head", [f"d_model → {c.vocab_size:,} logits", *tie], HEAD, "embed"))
    return items, [r1, r2]


# ----------------------------------------------------------------------------- the picture
@dataclass
class Diagram:
    config: Config
    differing: list[str]  # fields that differ from the base, in Config order
    boxes: dict[str, frozenset]  # every drawn box id -> the Config fields it depicts
    highlighted: set[str]
    figure: object  # matplotlib Figure
    patches: dict[str, object] = field(default_factory=dict)  # box id -> its matplotlib patch

    def fields_of(self, box: str) -> list[str]:
        return [f for f in self.differing if f in self.boxes[box]]

    def highlighted_in_order(self) -> list[str]:
        return [b for b in self.boxes if b in self.highlighted]

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if not path.lower().endswith((".svg", ".png")):
            raise LmzooError(f"{path}: a diagram is saved as .svg or .png")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LmzooError(f"{path}: the folder {folder} does not exist")
        self.figure.savefig(path, dpi=110)


def highlight_fields(config: Config, base: Config | None) -> list[str]:
    """What `lmzoo diff BASE CONFIG` names; against the classic decoder, sizes aside."""
    if base is not None:
        return differing_fields([base, config])
    return architecture_fields(config)


def draw(config: Config, base: Config | None = None, label: str = "", base_label: str | None = None) -> Diagram:
    """The picture of `config`'s decoder, highlighting what differs from `base` (default: the
    classic decoder, sizes aside)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LmzooError("drawing needs matplotlib: pip install 'lmzoo[plot]'") from None

    items, residuals = plan(config)
    differing = highlight_fields(config, base)
    pos, frame, height = _layout(items)
    fig = Figure(figsize=(WIDTH * SCALE, height * SCALE))  # no pyplot: nothing global, no display
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    _box(ax, 0.45, frame[0], X1 + 0.3 - 0.45, frame[1] - frame[0], ("#f7f7f7", "#9e9e9e"), lw=1, z=0, round=0.2)

    picture = Diagram(config, differing, {}, set(), fig)
    for it in items:
        if it.kind == "]":
            continue
        hot = bool(it.fields & set(differing))
        picture.boxes[it.id] = it.fields
        if hot:
            picture.highlighted.add(it.id)
        patch, note_y = _draw_item(ax, it, pos, frame, HIGHLIGHT if hot else COLORS[it.color], hot, config)
        picture.patches[it.id] = patch
        if hot:  # name the differing fields beside the box
            names = textwrap.fill(", ".join(picture.fields_of(it.id)), 30)
            ax.text(NOTE_X, note_y, names, ha="left", va="center", fontsize=8, color=HIGHLIGHT[1], zorder=4)
    _draw_flow(ax, items, pos, residuals, height)

    ax.text(0.45, height - 0.45, f"{label or config.family}: the {config.family} decoder", ha="left", va="center",
            fontsize=13, weight="bold")
    against = f"differs from {base_label or 'the base'}" if base is not None else \
        "differs from the classic decoder (sizes aside)"
    _box(ax, 0.45, height - 0.98, 0.34, 0.2, HIGHLIGHT, lw=1.5, z=3, round=0.04)  # the legend's swatch
    ax.text(0.92, height - 0.88, against + ("" if differing else ": nothing does"), ha="left", va="center",
            fontsize=9, color="#444444")
    return picture


def _layout(items: list[Item]) -> tuple[dict, tuple[float, float], float]:
    """Bottom-up positions: each item one arrow gap above the previous one. Returns the items'
    (bottom, top), the block frame's (bottom, top) and the picture's height."""
    y, pos, frame = 0.75, {}, [0.0, 0.0]
    for it in items:
        if it.kind == "[":
            frame[0], y = y + GAP / 2, y + GAP / 2 + PAD
        elif it.kind == "]":
            frame[1] = y = y + PAD + 0.3  # room for the "× N blocks" tag
        else:
            pos[it.id] = (y + GAP, y + GAP + it.height)
            y += GAP + it.height
    return pos, (frame[0], frame[1]), y + GAP + 1.75  # the logits label and the title above


def _box(ax, x, y, w, h, colors, lw, z, round=0.12, dashed=False):
    from matplotlib.patches import FancyBboxPatch

    patch = FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={round}", fc=colors[0],
                           ec=colors[1], lw=lw, ls="--" if dashed else "-", zorder=z)
    ax.add_patch(patch)
    return patch


def _draw_item(ax, it: Item, pos, frame, colors, hot: bool, c: Config):
    """One item: the repeat tag, a residual sum or a box. Returns its patch and the y of its note."""
    from matplotlib.patches import Circle

    if it.kind == "[":  # the repeat tag, under the frame's top edge
        y0 = frame[1] - 0.42
        patch = _box(ax, X1 - 1.55, y0, 1.7, 0.34, colors, lw=2 if hot else 1, z=3, round=0.1)
        ax.text(X1 - 0.7, y0 + 0.17, it.title, ha="center", va="center", fontsize=9.5, weight="bold", zorder=4)
        return patch, y0 + 0.17
    y0, y1 = pos[it.id]
    if it.kind == "add":
        cy = (y0 + y1) / 2
        patch = Circle((CX, cy), 0.22, fc=colors[0], ec=colors[1], lw=2 if hot else 1.2, zorder=3)
        ax.add_patch(patch)
        ax.text(CX, cy, "+", ha="center", va="center", fontsize=13, weight="bold", zorder=4)
        ax.text(CX + 0.34, cy, it.note, ha="left", va="center", fontsize=8, color="#666666", zorder=4)
        return patch, cy
    if it.id == "mlp" and c.n_experts:  # the other experts, stacked behind
        for k in (2, 1):
            _box(ax, X0 + 0.09 * k, y0 + 0.07 * k, X1 - X0, y1 - y0, colors, lw=1, z=2.5 - 0.1 * k)
    patch = _box(ax, X0, y0, X1 - X0, y1 - y0, colors, lw=2.2 if hot else 1.2, z=3, dashed=it.dashed)
    lines = it.lines
    ax.text(CX, y1 - 0.26 if lines else (y0 + y1) / 2, it.title, ha="center", va="center", fontsize=10,
            weight="bold", zorder=4)
    for k, line in enumerate(lines):
        ax.text(CX, y1 - 0.5 - LINE * k, line, ha="center", va="center", fontsize=8.3, color="#333333", zorder=4)
    return patch, (y0 + y1) / 2


def _draw_flow(ax, items, pos, residuals, height) -> None:
    """Arrows up the column from the token ids to the logits, and the residual connections: from
    a branch point on the column, along the rail on the left, into their sum."""
    spans = [(0.45, 0.45)] + [pos[i.id] for i in items if i.id in pos] + [(height - 1.6, height - 1.6)]
    for (_, top), (bottom, _) in itertools.pairwise(spans):
        _arrow(ax, (CX, top), (CX, bottom))
    ax.text(CX, 0.3, "token ids", ha="center", va="center", fontsize=9, style="italic")
    ax.text(CX, height - 1.45, "next-token logits", ha="center", va="center", fontsize=9, style="italic")
    for below, add in residuals:
        yb, cy = pos[below][0] - GAP / 2, sum(pos[add]) / 2
        ax.plot([CX, RAIL, RAIL], [yb, yb, cy], color="#555555", lw=1.2, zorder=1)
        ax.plot([CX], [yb], "o", color="#555555", ms=4, zorder=2)
        _arrow(ax, (RAIL, cy), (CX - 0.22, cy))


def _arrow(ax, start, end) -> None:
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, color="#555555", lw=1.2,
                                 shrinkA=0, shrinkB=0, zorder=2))
