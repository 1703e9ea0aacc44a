"""How much the fast weight formats change the model: perplexity and top-1 agreement with fp32.

    .venv/bin/python bench/quality.py [--json PATH]      # also run by bench/bench.py

The embedded model reads HELD_OUT (written for this file, so no training corpus holds it)
teacher-forced, once per mode, each mode on its own fresh copy of the fp32 model:

    fp32   the model as lmzoo.load() gives it
    bf16   model.to(torch.bfloat16)
    int8   lmzoo.infer.quant.quantize(model, "int8")   weight-only, one scale per output row
    int4   lmzoo.infer.quant.quantize(model, "int4")   weight-only, groups of 32
    int4_fp32_head   the same with head=False: the blocks in int4, the (tied) head left in fp32

and reports, per mode:
    perplexity  exp(mean next-token cross-entropy over the text's T-1 targets)
    change      perplexity / fp32's perplexity - 1
    top-1       the fraction of the T positions at which the mode's argmax equals fp32's

against the targets of issue 8: top-1 >= 95%, perplexity within 2% (bf16, int8) and 5% (4-bit).

int4_fp32_head is a diagnostic, not a mode the decode rows time: the embedded GGUF keeps its
blocks in 4-bit Q4_1 (which int4's groups of 32 reproduce almost exactly) but its token
embedding, which is also the head, in 8-bit Q8_0; the row shows how much of int4's loss is the head's.
"""
import argparse
import copy
import json
import math
import sys

import torch

HELD_OUT = """\
The lighthouse keeper on the northern island kept two logbooks. The first was the official one, \
in which she wrote the time the lamp was lit, the hours of fog, the ships that passed and the \
state of the sea. The second was her own. In it she wrote down the colours of the evening sky, \
the birds that rested on the gallery rail, and the small repairs she made to the house: a hinge \
oiled in March, a broken pane replaced before the autumn storms, a new shelf for the books that \
the supply boat brought every second month.

When the supply boat came, the skipper would stay for a cup of tea and tell her what had happened \
on the mainland. A bridge had been built across the river mouth; the old school had become a \
museum; the baker's son had gone to study engineering in the capital and written home that the \
trains there ran underground, in tunnels lit all night. She listened, asked questions, and wrote \
some of it in the second logbook, because a story told at a kitchen table is easily lost.

The lamp itself was older than the house. Its lens had been ground by hand more than a century \
earlier, in a workshop that no longer existed, and it was made of hundreds of glass prisms set \
in brass rings. Every morning she covered it with a linen cloth, so that the sun would not be \
focused onto the wick and start a fire in the middle of the day. Every evening she took the \
cloth away, trimmed the wick, wound the clockwork that turned the lens, and watched the first \
beam sweep across the water.

In winter the work was harder. Ice formed on the windows of the lantern room and had to be \
scraped off from the outside, with a rope tied around her waist. The wind could blow for days \
without pause, and the spray reached the top of the tower. On those nights she did not sleep \
much. She sat by the stove with a pot of coffee, went up the stairs every hour to check the \
flame, and counted the lights of the fishing boats that were still out, hoping to see the \
number grow smaller as they came home.

Years later, when the light was automated and the keeper moved to a town on the coast, the \
official logbooks were sent to the national archive. The second logbook stayed with her. A \
historian who visited her once asked whether she would give it to the archive as well. She \
thought about it for a long time, then said that she would, but only after she had copied out \
the parts about the birds, which she wanted to keep reading in the evenings.
"""

MODES = ("fp32", "bf16", "int8", "int4", "int4_fp32_head")
MIN_AGREEMENT = 0.95
MAX_PPL_CHANGE = {"bf16": 0.02, "int8": 0.02, "int4": 0.05, "int4_fp32_head": 0.05}


def fresh(model, mode):
    """A copy of the fp32 model in `mode` (fp32: the model itself)."""
    from lmzoo.infer.quant import quantize
    if mode == "fp32":
        return model
    m = copy.deepcopy(model)
    if mode == "bf16":
        return m.to(torch.bfloat16)
    return quantize(m, "int4", head=False) if mode == "int4_fp32_head" else quantize(m, mode)


@torch.inference_mode()
def teacher_forced(model, ids):
    """(cross-entropy of each next token [T-1], argmax at each position [T]) for ids [1, T]."""
    logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
    nll = -logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
    return nll, logp.argmax(-1)


def measure(model, tok, text=HELD_OUT):
    """{mode: {perplexity, change, top1_agreement, targets, met}} plus the text's token count."""
    ids = torch.tensor([tok.encode(text)])
    out = {"tokens": ids.shape[1], "modes": {}}
    for mode in MODES:
        m = fresh(model.eval(), mode)
        nll, top = teacher_forced(m, ids)
        if mode == "fp32":
            ref_ppl, ref_top = math.exp(nll.mean().item()), top
        ppl = math.exp(nll.mean().item())
        fig = {"perplexity": ppl, "change": ppl / ref_ppl - 1,
               "top1_agreement": (top == ref_top).float().mean().item()}
        if mode in MAX_PPL_CHANGE:
            fig["targets"] = {"top1_agreement": MIN_AGREEMENT, "max_abs_change": MAX_PPL_CHANGE[mode]}
            fig["met"] = fig["top1_agreement"] >= MIN_AGREEMENT and abs(fig["change"]) <= MAX_PPL_CHANGE[mode]
        out["modes"][mode] = fig
        del m
    return out


def print_table(q):
    print(f"\nquality on a held-out text of {q['tokens']} tokens, teacher-forced (targets: top-1 agreement "
          f">= {MIN_AGREEMENT:.0%}; perplexity within 2% bf16/int8, 5% int4)")
    print(f"{'mode':<16}{'perplexity':>12}{'change':>9}{'top-1 vs fp32':>15}{'target met':>12}")
    for mode, fig in q["modes"].items():
        met = "" if "met" not in fig else ("yes" if fig["met"] else "NO")
        print(f"{mode:<16}{fig['perplexity']:>12.3f}{100 * fig['change']:>+8.2f}%"
              f"{100 * fig['top1_agreement']:>14.1f}%{met:>12}")


def main(argv=None):
    import lmzoo
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = lmzoo.load()
    q = measure(model, tok)
    print_table(q)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(q, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
