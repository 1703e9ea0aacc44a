"""Sparse attention, sparse in compute (issue 26): the targets, measured side by side in one run.

    python bench/attention.py [--quick] [--json FILE] [--plot FILE.png]

1. One attention layer, 12 heads of 64, w = 256 (band, window, stride and block), n = 1024..16384:
   dense (SDPA's causal kernel), banded, strided, fixed, and masked-banded (the dense-mask path
   the banded one replaced), through `lmzoo attention-cost`'s own run(). Prints the table,
   the fitted exponents, and the ratios at the longest length: dense / banded time, banded /
   dense peak memory, and masked-banded / banded.
2. Where the targets' limits lie: SDPA's CPU kernel's time per score on blocks of C queries by C
   keys (the shape a band's chunks give it) against its causal kernel over the whole sequence,
   and the memory every implementation holds in forward + backward (the output and the three
   input gradients) against the dense layer's peak.
3. Generation: a tiny Mistral-style model (window 512, 4 layers) generates 8192 tokens; the KV
   cache's bytes, per kind of layer, at 1k, 4k and 8k tokens, with the rolling cache and without.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lmzoo  # noqa: E402
from lmzoo.show.attention_cost import as_table, median_seconds, run, save_plot  # noqa: E402


def layer_costs(lengths, repeats):
    kinds = ["dense", "banded", "strided", "fixed", "masked-banded"]
    result = run(kinds, lengths, width=256, summary=8, heads=12, head_size=64, repeats=repeats,
                 progress=lambda r: print(f"  {r['pattern']:>14} n={r['n']:<6} fwd {r['forward_s'] * 1e3:8.1f} ms",
                                          file=sys.stderr, flush=True))
    print(as_table(result, "markdown"))
    n = max(lengths)
    at = {r["pattern"]: r for r in result["rows"] if r["n"] == n}
    ratios = {
        "n": n,
        "dense/banded forward": at["dense"]["forward_s"] / at["banded"]["forward_s"],
        "dense/banded fwd+bwd": at["dense"]["train_s"] / at["banded"]["train_s"],
        "masked-banded/banded forward": at["masked-banded"]["forward_s"] / at["banded"]["forward_s"],
    }
    if at["dense"]["peak_bytes"] and at["banded"]["peak_bytes"]:
        ratios["banded/dense peak memory"] = at["banded"]["peak_bytes"] / at["dense"]["peak_bytes"]
        ratios["banded/masked-banded peak memory"] = at["banded"]["peak_bytes"] / at["masked-banded"]["peak_bytes"]
    print()
    for name, value in ratios.items():
        print(f"{name:>34}: {value:.3g}")
    return result, ratios


def kernel_rates(n, heads=12, head_size=64, blocks=(64, 256, 1024), repeats=3):
    """ns per score of SDPA's CPU kernel: the dense causal layer over all n queries (n²/2 scores per
    head), and unmasked blocks of C queries by C keys (n·C per head), the chunks a band is made of."""
    q, k, v = (torch.randn(1, heads, n, head_size) for _ in range(3))

    sdpa = torch.nn.functional.scaled_dot_product_attention
    rates = {}
    with torch.no_grad():
        dense_s = median_seconds(lambda: sdpa(q, k, v, is_causal=True), repeats)
        rates["dense causal"] = dense_s / (heads * n * n / 2) * 1e9
        for C in blocks:
            qb, kb, vb = (x.view(heads, n // C, C, head_size).transpose(0, 1) for x in (q, k, v))
            rates[f"blocks of {C}"] = median_seconds(lambda: sdpa(qb, kb, vb), repeats) / (heads * n * C) * 1e9  # noqa: B023
    print("\nSDPA's CPU kernel, ns per score:")
    for name, ns in rates.items():
        print(f"{name:>18}: {ns:.2f}")
    return rates


def generation_cache(tokens, window):
    c = lmzoo.preset("mistral-7b").replace(vocab_size=256, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2,
                                           d_ff=128, max_seq_len=tokens + 16, sliding_window=window)
    model = lmzoo.from_config(c).eval()
    rows = []
    for n in (1024, 4096, tokens):
        rolling, full = model.new_cache(1, n), model.new_cache(1, n, rolling=False)
        rows.append({"tokens": n, "rolling_bytes": rolling.nbytes(), "full_bytes": full.nbytes()})
    start = time.perf_counter()
    out = model.generate([[1, 2, 3]], max_new_tokens=tokens - 3)[0]
    seconds = time.perf_counter() - start
    print(f"\ngeneration: {len(out)} tokens in {seconds:.1f} s, window {window}, {c.n_layers} windowed layers")
    print("| tokens | KV cache, rolling | KV cache, every slot |\n|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['rolling_bytes'] / 2**10:.0f} KiB | {r['full_bytes'] / 2**10:.0f} KiB |")
    return {"tokens": len(out), "seconds": seconds, "cache": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short lengths, one repeat: a smoke run")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--plot", default=None, help="also draw the layer costs, log-log, to this PNG (matplotlib)")
    args = ap.parse_args()
    torch.manual_seed(0)
    lengths = [256, 512, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384]
    result, ratios = layer_costs(lengths, 1 if args.quick else 3)
    if args.plot:
        save_plot(result, args.plot)
    n = max(lengths)
    rates = kernel_rates(n, blocks=(64, 256) if args.quick else (64, 256, 1024))
    held = 4 * n * 12 * 64 * 4  # bytes: the output and the gradients of q, k and v, fp32
    dense_peak = next(r["peak_bytes"] for r in result["rows"] if r["pattern"] == "dense" and r["n"] == n)
    if dense_peak:
        print(f"output + input gradients: {held / 2**20:.0f} MB, {held / dense_peak:.2f} of the dense layer's peak")
    ratios["held/dense peak memory"] = held / dense_peak if dense_peak else None
    generation = generation_cache(2048 if args.quick else 8192, 512)
    if args.json:
        Path(args.json).write_text(json.dumps({"layer": result, "ratios": ratios, "kernel_ns_per_score": rates,
                                                "generation": generation}, indent=1))


if __name__ == "__main__":
    main()
