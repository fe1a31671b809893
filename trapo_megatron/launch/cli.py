"""`trapo launch`: run a recipe's training (or conversion, evaluation, smoke test) with NeMo-Run.

    trapo launch --recipe tiny-cpu                          # torchrun on this machine
    trapo launch --recipe qwen2.5-32b --executor slurm --account A --container-image IMG \\
        --mount /lustre:/lustre --dryrun -- model.hf_path=/lustre/models/Qwen2.5-32B  # the sbatch script

Everything after ``--`` goes to the task (config overrides for train, flags for eval/convert); the recipe
is a flag so that the launcher's flags and the task's arguments never interleave. Wired into
the `trapo` command through :func:`add_launch_arguments` and :func:`run_launch`; nemo_run is imported only
when a launch runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trapo_megatron.launch.recipes import (
    IMAGE_CODE_DIR,
    PACKAGED_CODE_DIR,
    RECIPES,
    TASKS,
    ClusterSettings,
    get_recipe,
    task_args,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trapo launch`."""
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="example run to launch")
    parser.add_argument("task_args", nargs="*", default=[],
                        help="after --: config overrides (train) or flags (eval, convert) for the task")
    parser.add_argument("--task", choices=sorted(TASKS), default="train",
                        help="; ".join(f"{k}: {v.help}" for k, v in TASKS.items()))
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="local: torchrun on this machine; slurm: sbatch (default %(default)s)")
    parser.add_argument("--dryrun", action="store_true",
                        help="print what would run (for Slurm: the sbatch script) and exit")
    parser.add_argument("--detach", action="store_true", help="return once submitted (Slurm)")
    parser.add_argument("--name", default=None, help="experiment name (default trapo-<recipe>-<task>)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="local: processes for distributed tasks (default: the recipe's)")
    parser.add_argument("--code-dir", default=None,
                        help=f"where the repo (its configs) is for the job; default: this checkout locally, "
                             f"{IMAGE_CODE_DIR} (the image's copy) on Slurm")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("--package-code", action="store_true",
                        help="Slurm: ship this checkout's committed code with the job (git archive) "
                             "and run it instead of the image's copy")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--account", default="", help="Slurm account")
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--time", default=None, help="wall-clock limit (default: the recipe's)")
    slurm.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's)")
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node (default: the recipe's)")
    slurm.add_argument("--container-image", default="", help="image built from the Dockerfile")
    slurm.add_argument("--mount", action="append", default=[], metavar="SRC:DST", help="container mount")
    slurm.add_argument("--job-dir", default="", help="NeMo-Run job directory on the cluster")
    slurm.add_argument("--ssh", default=None, metavar="USER@HOST", help="submit through this login node")


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r} must look like KEY=VALUE")
        env[key] = value
    return env


def run_launch(args: argparse.Namespace) -> int:
    """Build the task and executor, then dry-run, submit or run it; non-zero when the task failed."""
    try:
        recipe, task = get_recipe(args.recipe), TASKS[args.task]
        env = _parse_env(args.env)
        local = args.executor == "local"
        shipped = args.package_code and not local
        default_dir = str(REPO_ROOT) if local else PACKAGED_CODE_DIR if shipped else IMAGE_CODE_DIR
        code_dir = args.code_dir or default_dir
        if shipped:
            env.setdefault("PYTHONPATH", PACKAGED_CODE_DIR)
        argv = task_args(recipe, task, code_dir, args.task_args)
        cluster = None if local else ClusterSettings(
            account=args.account, partition=args.partition, time=args.time, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, container_image=args.container_image, mounts=args.mount,
            env=env, job_dir=args.job_dir, ssh=args.ssh, package_code=shipped,
        )
    except ValueError as e:
        print(f"trapo launch: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{args.recipe}-{args.task}".replace(".", "_")

    from trapo_megatron.launch import executors  # imports nemo_run (seconds): only now

    script = executors.script_task(task, argv)
    try:
        if local:
            executor = executors.local_executor(task, recipe, args.nproc_per_node, env)
        else:
            executor = executors.slurm_executor(task, recipe, cluster)
    except ValueError as e:
        print(f"trapo launch: {e}", file=sys.stderr)
        return 2
    if args.dryrun and local:
        print(" ".join(["python", "-m", task.module, *argv]))
        return 0
    try:
        if args.dryrun:
            print(executors.sbatch_script(script, executor, name))
            return 0
        return executors.run_experiment(script, executor, name, detach=args.detach)
    except Exception as e:  # noqa: BLE001 - NeMo-Run's own errors (no sbatch, ssh, torchrun) end the launch
        print(f"trapo launch: NeMo-Run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trapo launch", description=__doc__.splitlines()[0])
    add_launch_arguments(parser)
    return run_launch(parser.parse_args(argv))
