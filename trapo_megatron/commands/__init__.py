"""The ``trapo`` command line: one module per subcommand, all in this package.

Each subcommand module exposes ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``; the table
below is the whole wiring. Modules are imported when the parser is built, so they keep heavy imports
(megatron, vLLM, NeMo-Run) inside their run functions.
"""

from __future__ import annotations

import argparse
import importlib

# subcommand -> one-line help; its module is trapo_megatron.commands.<subcommand>
SUBCOMMANDS: dict[str, str] = {
    "train": "run TRAPO training from a YAML config (torchrun for several ranks)",
    "demo": "run the embedded CPU demo: TRAPO on 3-digit addition, TP=2 over gloo",
    "data": "inspect a data file: its fields, a parsed example, the load report",
    "config": "show every config field with its type, default and meaning",
    "plot": "draw the training curves of a run directory to a PNG",
    "convert": "convert checkpoints: hf-to-mcore, mcore-to-hf",
    "plan": "memory planner: which TP x PP x DP layouts fit a model on a cluster",
    "eval": "avg@k / pass@k on math benchmarks with math-verify",
    "launch": "launch training/conversion/eval with NeMo-Run (local or Slurm)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trapo",
        description="TRAPO (Trust-Region Adaptive Policy Optimization) post-training on Megatron-Core.",
        epilog="Run `trapo <command> --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__name__}.{name}")
        attr = name.replace("-", "_")
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"add_{attr}_arguments")(p)
        p.set_defaults(_run=getattr(module, f"run_{attr}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
