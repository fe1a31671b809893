"""`trapo train`: a TRAPO run from a YAML config plus dotted overrides.

One process per rank: under torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT), or alone for TP = PP = DP = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from trapo_megatron.config import ConfigError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, action="append",
                        help="YAML file (see examples/); repeat to layer files, e.g. a preset then "
                             "examples/ablations/grpo.yaml. Every field: `trapo config`")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run.output_dir>/checkpoints/latest when it exists")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, e.g. run.max_steps=10 optimizer.lr=1e-6 loss.prefix_objective=sft")
    parser.epilog = ("Several ranks: torchrun --nproc-per-node N -m trapo_megatron.commands train "
                     "--config FILE ...; N must be a multiple of parallel.tensor_model_parallel_size x "
                     "pipeline_model_parallel_size.")


def run_train(args: argparse.Namespace) -> int:
    from trapo_megatron.train.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        if world == 1 and cfg.parallel.model_parallel_size > 1:
            n = cfg.parallel.model_parallel_size
            print(f"trapo train: this TP x PP layout needs {n} ranks; run it under torchrun, e.g. torchrun "
                  f"--nproc-per-node {n} -m trapo_megatron.commands train --config ...", file=sys.stderr)
            return 2
        from trapo_megatron.train.setup import (
            check_config,  # megatron and transformers: after a bad key failed fast
        )

        check_config(cfg, world)
    except (ConfigError, ValueError) as e:
        print(f"trapo train: config error: {e}", file=sys.stderr)
        return 2
    from trapo_megatron.train.stopping import EXIT_DIVERGED, EXIT_STOPPED, DivergedError
    from trapo_megatron.trainer import train

    try:
        summary = train(cfg, resume=args.resume)
    except DivergedError as e:
        print(f"trapo train: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return EXIT_STOPPED if summary["stopped"] else 0
