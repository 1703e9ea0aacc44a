"""The commands that show the differences between families (diff, families, diagram) and what
attention patterns cost (attention-cost).

Each prints what lmzoo.show.compare / lmzoo.show.diagram compute from the Configs; nothing is written by
hand, so the tables and pictures follow the presets and checkpoints as they change.
"""

from __future__ import annotations

from ..errors import LmzooError


def register(sub) -> None:
    """Add this module's subcommands to the `lmzoo` parser."""
    from .compare import FLOPS_CONTEXT

    p = sub.add_parser("diff", help="fields in which models differ, with their meaning, and what follows")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="two or more: preset names, Hugging Face directories or .gguf files (only configs are read)")
    p.add_argument("--format", default="text", help="text (default), markdown or json")
    p.add_argument("--context", type=int, default=FLOPS_CONTEXT,
                   help=f"context length at which FLOPs per token are counted (default {FLOPS_CONTEXT})")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("families", help="one row per preset: sizes, norms, positions, MLP, biases, attention")
    p.add_argument("--format", default="text", help="text (default), markdown or json")
    p.set_defaults(run=cmd_families)

    p = sub.add_parser("diagram", help="draw a model's decoder block, its differences highlighted")
    p.add_argument("source", help="preset name, Hugging Face directory or .gguf file")
    p.add_argument("--out", default=None, help="FILE.svg or FILE.png (default: diagram-<name>.svg)")
    p.add_argument("--vs", default=None, metavar="BASE",
                   help="highlight what differs from this model (default: from the classic decoder)")
    p.set_defaults(run=cmd_diagram)

    p = sub.add_parser("attention-cost", help="measure dense vs sparse attention: time and memory against length, "
                                              "with fitted exponents and a log-log plot")
    p.add_argument("--patterns", default="dense,banded,strided,fixed",
                   help="comma-separated: dense, banded, strided, fixed, window, or masked-<pattern> for the "
                        "dense-mask reference (default dense,banded,strided,fixed)")
    p.add_argument("--seq", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--width", type=int, default=256, help="band width / window / stride / block (default 256)")
    p.add_argument("--summary", type=int, default=8, help="fixed pattern: summary keys per block (default 8)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--head-size", type=int, default=64, help="head size (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the median is shown (default 3)")
    p.add_argument("--format", default="text", help="text (default), markdown or json")
    p.add_argument("--out", default="attention-cost.png", help="the log-log plot, PNG (default attention-cost.png); "
                                                               "'-' for none")
    p.set_defaults(run=cmd_attention_cost)


def cmd_diff(args) -> None:
    from .compare import diff_report

    print(diff_report(args.sources, args.format, args.context))


def cmd_families(args) -> None:
    from .compare import families_report

    print(families_report(args.format))


def cmd_diagram(args) -> None:
    from .compare import label_of, load_config
    from .diagram import draw

    out = args.out or f"diagram-{label_of(args.source)}.svg"
    if not out.lower().endswith((".svg", ".png")):
        raise LmzooError(f"--out {out}: the file name must end in .svg or .png")
    config = load_config(args.source)
    base = load_config(args.vs) if args.vs else None
    picture = draw(config, base, label=label_of(args.source), base_label=label_of(args.vs) if args.vs else None)
    picture.save(out)
    against = f"from {label_of(args.vs)}" if args.vs else "from the classic decoder (sizes aside)"
    print(f"highlighted: what differs {against}")
    for box in picture.highlighted_in_order():
        print(f"  {box:<14} {', '.join(picture.fields_of(box))}")
    if not picture.highlighted:
        print("  (nothing)")
    print(f"wrote {out}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmzooError(f"{flag} {text!r}: give comma-separated whole numbers") from None


def cmd_attention_cost(args) -> None:
    import json
    import sys

    from . import attention_cost

    if args.format not in ("text", "markdown", "json"):
        raise LmzooError(f"--format {args.format!r}: choose text, markdown or json")
    for flag, value in (("--width", args.width), ("--summary", args.summary), ("--heads", args.heads),
                        ("--head-size", args.head_size), ("--repeats", args.repeats)):
        if value < 1:
            raise LmzooError(f"{flag} {value}: must be at least 1")
    if args.out != "-" and not args.out.lower().endswith(".png"):
        raise LmzooError(f"--out {args.out}: the file name must end in .png (or '-' for no plot)")
    kinds = [k.strip() for k in args.patterns.split(",") if k.strip()]
    result = attention_cost.run(
        kinds, _int_list(args.seq, "--seq"), width=args.width, summary=args.summary, heads=args.heads,
        head_size=args.head_size, repeats=args.repeats,
        progress=lambda r: print(f"  {r['pattern']:>16} n={r['n']:<6} {r['train_s'] * 1e3:9.1f} ms fwd+bwd",
                                 file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1) if args.format == "json" else attention_cost.as_table(result, args.format))
    if args.out != "-":
        try:
            attention_cost.save_plot(result, args.out)
        except ImportError:
            print("note: no plot drawn: matplotlib is not installed (pip install 'lmzoo[plot]')", file=sys.stderr)
            return
        print(f"wrote {args.out}")
