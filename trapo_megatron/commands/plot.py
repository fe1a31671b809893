"""`trapo plot RUN_DIR`: the run's curves (from metrics.jsonl) as one PNG, the way the paper reports them."""

from __future__ import annotations

import argparse

from trapo_megatron.plot import plot_run


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (it holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")


def run_plot(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0
