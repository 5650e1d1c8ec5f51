"""`--quick`, every benchmark's toy mode (what the test suite runs): the same code path at sizes that take seconds."""

from __future__ import annotations

import argparse


def parse_quick(p: argparse.ArgumentParser, argv: list[str] | None, quick: dict) -> argparse.Namespace:
    """The arguments; with `--quick`, the defaults are `quick`'s (options given still win), announced on stdout."""
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**quick)
        args = p.parse_args(argv)
        print("quick mode: toy sizes, to check that the benchmark runs; its figures measure nothing", flush=True)
    return args
