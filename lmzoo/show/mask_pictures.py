"""`lmzoo masks`: the attention patterns of the mask builder, drawn as text and as a PNG.

Every picture comes from lmzoo.nn.masks.build_mask itself, so what the user sees is what the
model uses. Rows are queries, columns keys; a filled cell means "may attend".
"""

from __future__ import annotations

import torch

from ..errors import LmzooError
from ..nn.masks import build_mask

KINDS = ("causal", "prefix", "sliding", "strided", "fixed")
TITLES = {"causal": "causal LM", "prefix": "prefix LM (prefix={prefix})", "sliding": "sliding window (w={window})",
          "strided": "sparse strided (l={stride})", "fixed": "sparse fixed (l={stride}, c={summary})"}


def check_arguments(kind: str, seq: int, prefix: int, window: int, stride: int, summary: int) -> None:
    """Each kind checks the arguments it uses, naming the flag that is wrong."""
    if seq < 1:
        raise LmzooError(f"--seq {seq}: the sequence needs at least one token")
    if kind == "prefix" and not 0 <= prefix <= seq:
        raise LmzooError(f"--prefix {prefix}: the prefix must lie within the sequence (0..{seq})")
    if kind == "sliding" and window < 1:
        raise LmzooError(f"--window {window}: a sliding window must be >= 1")
    if kind in ("strided", "fixed") and not 1 <= stride <= seq:
        raise LmzooError(f"--stride {stride}: the stride must be between 1 and the sequence length {seq}")
    if kind == "fixed" and not 1 <= summary <= stride:
        raise LmzooError(f"--summary {summary}: the fixed pattern needs 1 <= summary <= stride ({stride})")


def mask_of(kind: str, seq: int, prefix: int = 4, window: int = 4, stride: int = 4, summary: int = 1) -> torch.Tensor:
    """The [seq, seq] boolean pattern of one kind."""
    check_arguments(kind, seq, prefix, window, stride, summary)
    slots = torch.arange(seq)
    options = {
        "causal": {},
        "prefix": {"prefix_end": torch.tensor([prefix])},
        "sliding": {"window": window},
        "strided": {"pattern": "strided", "block": stride},
        "fixed": {"pattern": "fixed", "block": stride, "summary": summary},
    }
    if kind not in options:
        raise LmzooError(f"--kind {kind!r}: choose one of {', '.join(KINDS)} or all")
    return build_mask(slots, seq, **options[kind])[0, 0]


def title_of(kind: str, **args) -> str:
    return TITLES[kind].format(**args)


def as_text(mask: torch.Tensor, title: str) -> str:
    rows = [title, "    " + "".join(str(j % 10) for j in range(mask.shape[1]))]
    for i, row in enumerate(mask.tolist()):
        rows.append(f"{i:>3} " + "".join("█" if ok else "·" for ok in row))
    return "\n".join(rows)


def save_png(masks: dict[str, torch.Tensor], path: str) -> None:
    """A titled grid of the patterns side by side (matplotlib, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise LmzooError("drawing needs matplotlib: pip install 'lmzoo[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(masks)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    cmap = ListedColormap(["#f4f4f4", "#2b6cb0"])
    for ax, (title, mask) in zip(axes[0], masks.items(), strict=True):
        ax.imshow(mask.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
