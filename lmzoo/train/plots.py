"""The loss curve of a run, as a PNG.

matplotlib is optional (lmzoo[plot]): without it a finished run skips its picture with a
one-line note, rather than failing after the adapter and metrics are saved.
"""

from __future__ import annotations

import sys


def plot_loss(metrics: list[dict], path: str, title: str = "training loss") -> str | None:
    """The PNG's path, or None (with a note on stderr) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"lmzoo: note: no {path}: drawing the loss curve needs matplotlib (pip install 'lmzoo[plot]'); "
              "the run's adapter and metrics.jsonl are saved", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss", color="#2b6cb0")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss", color="#c05621")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
