"""The ``trapo`` command line.

Each subcommand lives in its own module and exposes ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> int``; the table below is the whole wiring. Modules are imported when the parser is
built, so they keep heavy imports (megatron, vLLM, NeMo-Run) inside their run functions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trapo_megatron.train_cli", "run TRAPO training from a YAML config (torchrun for several ranks)"),
    "demo": ("trapo_megatron.demo", "run the embedded CPU demo: TRAPO on 3-digit addition, TP=2 over gloo"),
    "data": ("trapo_megatron.data.cli", "inspect a data file: its fields, a parsed example, the load report"),
    "config": ("trapo_megatron.config_cli", "show every config field with its type, default and meaning"),
    "plot": ("trapo_megatron.plot", "draw the training curves of a run directory to a PNG"),
    "convert": ("trapo_megatron.convert.cli", "convert checkpoints: hf-to-mcore, mcore-to-hf"),
    "plan": ("trapo_megatron.plan.cli", "memory planner: which TP x PP x DP layouts fit a model on a cluster"),
    "eval": ("trapo_megatron.eval.cli", "avg@k / pass@k on math benchmarks with math-verify"),
    "launch": ("trapo_megatron.launch.cli", "launch training/conversion/eval with NeMo-Run (local or Slurm)"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Only the subcommands whose module is installed (and importable) are listed."""
    out = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trapo",
        description="TRAPO (Trust-Region Adaptive Policy Optimization) post-training on Megatron-Core.",
        epilog="Run `trapo <command> --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        attr = name.replace("-", "_")
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"add_{attr}_arguments")(p)
        p.set_defaults(_run=getattr(module, f"run_{attr}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
