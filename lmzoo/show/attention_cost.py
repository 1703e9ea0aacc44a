"""lmzoo attention-cost: what each attention pattern costs, measured, and its exponent fitted.

The seed document contrasts dense attention, O(n²), with GPT-3's sparse patterns. This measures
the claim on this machine: one layer's attention (the q/k/v/o projections, the same for every
pattern, are left out) at each sequence length, through the same code the model runs:
- dense: SDPA's causal kernel, as lmzoo's dense layers;
- banded and window: tiles of the band (lmzoo.nn.local_attention), O(n·w);
- strided and fixed: the band plus their far columns, O(n·(w + n/w)) and O(n·(w + n·summary/w));
- masked-<pattern>: today's reference, a dense n×n mask over SDPA (what the fast path replaced).
Time is the median of `repeats` runs, forward alone and forward + backward; memory is the peak
resident memory above what the inputs hold, during forward + backward (Linux: /proc's high-water
mark, reset before each run). Memory is measured in a child process whose allocator returns every
large block when it is freed (glibc's mmap threshold fixed from its start), so a peak is what the
run holds at once; in this process, what the timed runs left in the heap moved the band's peak
between 243 and 344 MB at 16k tokens. (The timed runs keep the default allocator: fixed, it made
them pay a page fault per large block, the band 11% slower.)
time ∝ n^k is fitted by least squares over the lengths measured.
"""

from __future__ import annotations

import ctypes
import json
import math
import statistics
import subprocess
import sys
import time

import torch

from ..config import Config
from ..errors import LmzooError
from ..nn.attention import sdpa
from ..nn.local_attention import plan_for
from ..nn.masks import PATTERNS, Visibility, build_mask

KINDS = (*PATTERNS, "window")


def _parse(kind: str) -> tuple[str, bool]:
    """('banded', masked?) from 'banded' or 'masked-banded'."""
    masked = kind.startswith("masked-")
    name = kind.removeprefix("masked-")
    if name not in KINDS or (masked and name == "dense"):
        raise LmzooError(f"--patterns: unknown pattern {kind!r}; choose from {', '.join(KINDS)}, "
                         f"or masked-<pattern> for the dense-mask reference")
    return name, masked


def attention_fn(kind: str, n: int, *, width: int, summary: int):
    """f(q, k, v) -> out for one kind at length n, through lmzoo's own attention code."""
    name, masked = _parse(kind)
    if name == "dense":
        return lambda q, k, v: sdpa(q, k, v, None, True)
    rules = {"window": width} if name == "window" else {"pattern": name, "block": width, "summary": summary}
    c = Config(n_layers=1, sliding_window=width if name == "window" else None,
               attention_pattern="dense" if name == "window" else name, sparse_block=width, sparse_summary=summary,
               sparse_layers="all")
    if not masked:
        plan = plan_for(c, name != "window", name == "window", n, Visibility(**rules), 0, None, None)
        if plan is not None:
            return plan
    mask = build_mask(torch.arange(n), n, **rules)  # the pattern covers the sequence, or the reference
    return lambda q, k, v: sdpa(q, k, v, mask, False)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return None


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory above the current level while fn() runs (Linux), or None."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is honest
    except (OSError, AttributeError):
        pass
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark (VmHWM) to the current size
    except OSError:
        return None
    fn()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return None if base is None else max(0, peak - base)


def median_seconds(f, repeats: int) -> float:
    """Median wall time of f() over `repeats` runs, after one untimed warm-up run (first-call
    allocations and kernel selection)."""
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kind: str, n: int, *, heads: int = 12, head_size: int = 64, width: int = 256, summary: int = 8,
            repeats: int = 3, seed: int = 0, memory: bool = True) -> dict:
    """One kind at one length: {'pattern', 'n', 'forward_s', 'train_s'} with memory=False, else
    {'pattern', 'n', 'peak_bytes'} (run() measures memory in a child process: see the top)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_size, generator=gen) for _ in range(3))
    grad = torch.randn(1, heads, n, head_size, generator=gen)
    fn = attention_fn(kind, n, width=width, summary=summary)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def train():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        fn(qg, kg, vg).backward(grad)

    if not memory:
        return {"pattern": kind, "n": n, "forward_s": median_seconds(forward, repeats),
                "train_s": median_seconds(train, repeats)}
    train()  # warm-up, as for the times
    return {"pattern": kind, "n": n, "peak_bytes": peak_extra_bytes(train)}


def _peaks_in_a_child(points, options) -> list:
    """peak_bytes of each (kind, n), measured by `python -m lmzoo.show.attention_cost` (see the top)."""
    spec = json.dumps({"points": points, "options": options})
    r = subprocess.run([sys.executable, "-m", "lmzoo.show.attention_cost", spec], capture_output=True, text=True)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise LmzooError(f"attention-cost: the child process that measures memory failed: {why}")
    return json.loads(r.stdout)


def fit_exponent(ns, values) -> float | None:
    """k in value ∝ n^k, least squares in log-log; None with fewer than two points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v]
    if len(pts) < 2:
        return None
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def run(kinds, lengths, *, progress=None, **options) -> dict:
    """Every kind at every length, and the fitted exponents: {'rows': [...], 'exponents': {kind: {...}}}."""
    for kind in kinds:
        _parse(kind)
    if not lengths or any(n < 2 for n in lengths):
        raise LmzooError(f"--seq {','.join(map(str, lengths))}: give lengths of at least 2")
    rows = []
    for kind in kinds:
        for n in lengths:
            rows.append(measure(kind, n, memory=False, **options))
            if progress:
                progress(rows[-1])
    for row, peak in zip(rows, _peaks_in_a_child([(r["pattern"], r["n"]) for r in rows], options), strict=True):
        row["peak_bytes"] = peak
    exponents = {}
    for kind in kinds:
        mine = [r for r in rows if r["pattern"] == kind]
        exponents[kind] = {f: fit_exponent([r["n"] for r in mine], [r[f] for r in mine])
                           for f in ("forward_s", "train_s", "peak_bytes")}
    return {"rows": rows, "exponents": exponents}


def _fmt_exp(x):
    return "—" if x is None else f"{x:.2f}"


def as_table(result: dict, fmt: str = "text") -> str:
    head = ["pattern", "n", "forward ms", "fwd+bwd ms", "peak MB"]
    lines = [[r["pattern"], str(r["n"]), f"{r['forward_s'] * 1e3:.1f}", f"{r['train_s'] * 1e3:.1f}",
              "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"] for r in result["rows"]]
    fits = [[kind, "n^k", _fmt_exp(e["forward_s"]), _fmt_exp(e["train_s"]), _fmt_exp(e["peak_bytes"])]
            for kind, e in result["exponents"].items()]
    if fmt == "markdown":
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in lines + fits]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head, *lines, *fits]) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *lines]]
    out += ["", "fitted exponents (time or memory ∝ n^k):"]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in fits]
    return "\n".join(out)


def save_plot(result: dict, path: str) -> None:
    """Log-log: time (forward solid, forward + backward dashed) and peak memory against n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (kind, e) in enumerate(result["exponents"].items()):
        mine = [r for r in result["rows"] if r["pattern"] == kind]
        ns = [r["n"] for r in mine]
        color = f"C{i}"
        ax_t.loglog(ns, [r["forward_s"] for r in mine], "o-", color=color,
                    label=f"{kind} forward (n^{_fmt_exp(e['forward_s'])})")
        ax_t.loglog(ns, [r["train_s"] for r in mine], "s--", color=color,
                    label=f"{kind} fwd+bwd (n^{_fmt_exp(e['train_s'])})")
        if all(r["peak_bytes"] for r in mine):
            ax_m.loglog(ns, [r["peak_bytes"] / 2**20 for r in mine], "o-", color=color,
                        label=f"{kind} (n^{_fmt_exp(e['peak_bytes'])})")
    ax_t.set(xlabel="sequence length n", ylabel="seconds", title="time of one attention layer")
    ax_m.set(xlabel="sequence length n", ylabel="MB", title="peak extra memory, forward + backward")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the child of _peaks_in_a_child: memory, with the allocator fixed first
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: blocks >= 128 KiB mapped alone
    except (OSError, AttributeError):
        pass
    spec = json.loads(sys.argv[1])
    print(json.dumps([measure(kind, n, **spec["options"])["peak_bytes"] for kind, n in spec["points"]]))
