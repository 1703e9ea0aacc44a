"""The commands that show the differences between families: diff, families, diagram."""

from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the `lmzoo` parser."""
