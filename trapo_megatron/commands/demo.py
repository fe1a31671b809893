"""`trapo demo` (what `make demo` runs): TRAPO on the shipped 3-digit-addition task, end to end through the
real stack — Megatron-Core at TP=2 over two gloo processes on CPU, the CPU twin engine fed by the weight
stream, math-verify rewards, distributed checkpoints and the final Hugging Face export."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).parents[1] / "assets" / "demo"
CONFIG = Path(__file__).parents[2] / "examples" / "tiny_cpu.yaml"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides of the demo config, e.g. run.max_steps=20")


def _asset_overrides(out: str) -> list[str]:
    return [f"model.hf_path={ASSETS / 'model'}", f"data.path={ASSETS / 'train.jsonl'}",
            f"evaluation.path={ASSETS / 'heldout.jsonl'}", f"run.output_dir={out}"]


def _worker(rank: int, world: int, overrides: list[str], out: str) -> dict:
    from trapo_megatron.train.console import library_output_to

    library_output_to(Path(out) / f"rank{rank}.log")  # before megatron's import-time warnings
    from trapo_megatron.train.config import load_config
    from trapo_megatron.trainer import train

    return train(load_config(str(CONFIG), overrides))


def run_demo(args: argparse.Namespace) -> int:
    from trapo_megatron.plot import read_metrics
    from trapo_megatron.testing import run_distributed
    from trapo_megatron.train.config import load_config
    from trapo_megatron.train.setup import check_config

    overrides = _asset_overrides(args.out) + list(args.overrides)
    try:  # fail fast on a bad override, before spawning
        cfg = load_config(str(CONFIG), overrides)
        world = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        check_config(cfg, world)
    except ValueError as e:  # ConfigError included
        print(f"trapo demo: config error: {e}", file=sys.stderr)
        return 2
    print(f"trapo demo: TRAPO on 3-digit addition, TP={cfg.parallel.tensor_model_parallel_size} "
          f"PP={cfg.parallel.pipeline_model_parallel_size} over {world} gloo processes, {cfg.run.max_steps} steps")
    t0 = time.perf_counter()
    print(f"trapo demo: library warnings go to {Path(args.out) / 'rank*.log'}")
    run_distributed(_worker, world, overrides, args.out, timeout=3600, threads=1)
    minutes = (time.perf_counter() - t0) / 60
    out = Path(args.out)
    evals = [r["heldout_accuracy"] for r in read_metrics(out) if r.get("heldout_accuracy") is not None]
    summary = {
        "minutes": round(minutes, 2),
        "heldout_accuracy_start": evals[0] if evals else None,
        "heldout_accuracy_end": evals[-1] if evals else None,
        "curves": str(out / "curves.png"),
        "metrics": str(out / "metrics.jsonl"),
        "checkpoint": str(out / "checkpoints"),
        "hf_export": str(out / "hf"),
    }
    print(json.dumps(summary, indent=2))
    return 0
