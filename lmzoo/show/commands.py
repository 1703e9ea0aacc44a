"""The commands that show the differences between families: diff, families, diagram.

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
