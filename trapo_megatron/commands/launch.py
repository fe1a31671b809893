"""`trapo launch`: run a training (or conversion, evaluation, smoke test) with NeMo-Run, here or on Slurm.

    trapo launch --recipe tiny-cpu                          # torchrun on this machine
    trapo launch --config my.yaml --nodes 2 --executor slurm -- run.max_steps=500   # your own config
    trapo launch --recipe qwen2.5-32b --executor slurm --account A --container-image IMG \\
        --mount /lustre:/lustre --dryrun -- model.hf_path=/lustre/models/Qwen2.5-32B  # the sbatch script

Everything after ``--`` goes to the task (config overrides for train, flags for eval/convert); a recipe is a
preset (configs, nodes, GPUs, layout, time) that ``--config`` files layer onto. Before anything is submitted
the training config is loaded here and checked (:mod:`trapo_megatron.launch.checks`): a launch that cannot
work exits 2 with one line. Wired into the `trapo` command through :func:`add_launch_arguments` and
:func:`run_launch`; nemo_run is imported only when a launch runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from trapo_megatron.launch import checks
from trapo_megatron.launch.checks import LaunchError
from trapo_megatron.launch.recipes import (
    IMAGE_CODE_DIR,
    NETWORK_ENV,
    PACKAGED_CODE_DIR,
    RECIPES,
    TASKS,
    ClusterSettings,
    Recipe,
    Task,
    get_recipe,
    task_args,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

PATH_KEYS = ("model.hf_path", "data.path", "evaluation.path", "run.output_dir")
"""Config keys holding paths the job opens. Relative ones are made absolute before submitting: from a
config file against the code directory (where the configs live), from an override against the current
directory."""
OUTPUT_KEYS = ("run.output_dir",)

CUSTOM_RECIPE = Recipe(configs=(), nodes=1, gpus_per_node=8, nproc_per_node=8, tp=1, pp=1)
"""What `--config` alone launches: one 8-GPU node; the layout is the config's own."""


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trapo launch`."""
    parser.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                        help="a preset: configs, nodes, GPUs, TP x PP, time (see recipes.py)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="your config (repeat to layer; after the recipe's configs, if any)")
    parser.add_argument("task_args", nargs="*", default=[],
                        help="after --: config overrides (train) or flags (eval, convert) for the task")
    parser.add_argument("--task", choices=sorted(TASKS), default="train",
                        help="; ".join(f"{k}: {v.help}" for k, v in TASKS.items()))
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="local: torchrun on this machine; slurm: sbatch (default %(default)s)")
    parser.add_argument("--dryrun", action="store_true",
                        help="print what would run (for Slurm: the sbatch script) and exit")
    parser.add_argument("--detach", action="store_true", help="return once submitted (Slurm)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when the planner predicts the layout does not fit the GPU")
    parser.add_argument("--gpu", default="h100-80gb", help="GPU type for the memory check (`trapo plan --gpu`)")
    parser.add_argument("--name", default=None, help="experiment name (default <recipe or config>-<task>)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node for distributed tasks, locally and on Slurm for CPU recipes "
                             "(default: the recipe's; GPU jobs run one per GPU)")
    parser.add_argument("--code-dir", default=None,
                        help=f"where the repo (its configs) is for the job; default: this checkout locally and "
                             f"on Slurm without a container, {IMAGE_CODE_DIR} (the image's copy) in one")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment, written into the job script (no secrets: see --env-from-host)")
    parser.add_argument("--env-from-host", action="append", default=[], metavar="NAME",
                        help="pass this variable (a token, a key) from the submitting environment by name; "
                             "its value is never written into the script")
    parser.add_argument("--package-code", action="store_true",
                        help="Slurm: ship this checkout's committed code with the job (git archive) "
                             "and run it instead of the image's copy")
    slurm = parser.add_argument_group("slurm")
    for flag, help_text in (("--account", "Slurm account"), ("--partition", "Slurm partition"),
                            ("--qos", "Slurm QOS"), ("--gres", "generic resources, e.g. gpu:8"),
                            ("--mem", "memory per node, e.g. 0 (all)"), ("--constraint", "node features"),
                            ("--exclude", "nodes to avoid"), ("--time", "wall-clock limit (default: the recipe's)")):
        slurm.add_argument(flag, default=None, help=help_text)
    slurm.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's)")
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per node (default: the recipe's)")
    slurm.add_argument("--container-image", default="",
                       help="image built from the Dockerfile; none: this checkout and interpreter on the nodes")
    slurm.add_argument("--mount", action="append", default=[], metavar="SRC:DST", help="container mount")
    slurm.add_argument("--container-env", action="append", default=[], metavar="NAME",
                       help="variable passed into the container (pyxis --container-env)")
    slurm.add_argument("--srun-arg", action="append", default=[], dest="srun_args", metavar="ARG",
                       help="extra srun argument for the training step, e.g. --srun-arg=--mpi=pmix")
    slurm.add_argument("--additional-parameter", action="append", default=[], metavar="NAME=VALUE",
                       help="any other #SBATCH flag, e.g. mail-type=END")
    slurm.add_argument("--python", default="", help="the job's interpreter (default: python in a container, "
                                                     "this interpreter without one)")
    slurm.add_argument("--retries", type=int, default=0,
                       help="requeue a failed or stopped job this many times (default %(default)s)")
    slurm.add_argument("--signal", default=ClusterSettings.signal,
                       help="SIG@SECONDS before the limit, the trainer checkpoints and exits; none: off "
                            "(default %(default)s)")
    slurm.add_argument("--chain", type=int, default=1,
                       help="submit N jobs, each starting after the previous ends and resuming the run")
    slurm.add_argument("--after", default="", metavar="JOBID",
                       help="start after this job ends (afterany), e.g. to resume a run whose job is running")
    slurm.add_argument("--job-dir", default="",
                       help="NeMo-Run's directory for the job's files (with --ssh: on the cluster)")
    slurm.add_argument("--ssh", default=None, metavar="USER@HOST[:PORT]", help="submit through this login node")
    slurm.add_argument("--ssh-identity", default="", metavar="KEY", help="private key for --ssh (default: the ssh "
                       "agent and ~/.ssh keys); --env-from-host names must then be set in the login node's sessions")


def _pairs(flag: str, pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"{flag} {pair!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _from_host(names: list[str], over_ssh: bool) -> list[str]:
    """The ``--env-from-host`` names, then the network knobs set here (NETWORK_ENV) when sbatch runs here
    (over ssh the login node's session is what the job inherits: name them with --env-from-host)."""
    network = [] if over_ssh else sorted(n for n in os.environ if NETWORK_ENV.fullmatch(n) and n not in names)
    return [*names, *network]


@dataclass
class Plan:
    """What a launch runs, once checked."""

    recipe: Recipe
    task: Task
    argv: list[str]
    cluster: ClusterSettings | None
    stop_signal: checks.SlurmSignal | None
    name: str


def _recipe(args: argparse.Namespace, task: Task) -> Recipe:
    if args.recipe:
        return get_recipe(args.recipe)
    if task.uses_config and not args.config:
        raise LaunchError("give --recipe or --config (or both: your configs layer onto the recipe's)")
    return CUSTOM_RECIPE


def _job_config_path(local: Path, code_dir: str, cluster: ClusterSettings | None) -> str:
    """Where the job reads a config file given here: the code directory's copy for files of this checkout;
    in a container, the mount's view of a file under a mount source; else the same path (shared file system)."""
    if local.is_relative_to(REPO_ROOT):
        return f"{code_dir.rstrip('/')}/{local.relative_to(REPO_ROOT)}"
    if cluster is None or not cluster.container_image:
        return str(local)
    for mount in cluster.mounts:
        src, dst = mount.split(":")[:2]
        if local.is_relative_to(src):
            return f"{dst.rstrip('/')}/{local.relative_to(src)}"
    raise LaunchError(f"--config {local}: the container cannot read it; put it under a --mount source or in "
                      "this checkout")


def _path_overrides(cfg: object, overrides: list[str], code_dir: str, in_container: bool) -> list[str]:
    """Overrides that make every relative path of PATH_KEYS absolute (see PATH_KEYS)."""
    from trapo_megatron.config import parse_override

    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    out = []
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value or value.startswith("/"):
            continue
        if key not in overridden:
            out.append(f"{key}={code_dir.rstrip('/')}/{value}")
        elif in_container:
            raise LaunchError(f"{key}={value} is relative: give the path as the container sees it")
        else:
            out.append(f"{key}={Path(value).resolve()}")
    return out


def _check_train(args: argparse.Namespace, recipe: Recipe, code_dir: str, cluster: ClusterSettings | None,
                 local_configs: list[str], extra: list[str], stop_signal: checks.SlurmSignal | None,
                 ) -> tuple[list[str], Recipe]:
    """Load the config here, run the pre-submit checks; returns the path overrides to add and the recipe
    (without --recipe: the config's own layout, TP x PP local processes)."""
    from trapo_megatron.config import ConfigError
    from trapo_megatron.train.config import engine_tensor_parallel_size, load_config

    layout = recipe.overrides() if args.recipe else []
    try:
        cfg = load_config(local_configs, [*layout, *extra])
        container = bool(cluster and cluster.container_image)
        paths = _path_overrides(cfg, extra, code_dir, container)
        cfg = load_config(local_configs, [*layout, *extra, *paths])
    except ConfigError as e:
        raise LaunchError(f"config: {e}") from None
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if not args.recipe:
        recipe = replace(recipe, tp=tp, pp=pp, nproc_per_node=tp * pp if cluster is None else recipe.nproc_per_node)
    if cluster is None:
        nodes, gpus, per_node = 1, 0, args.nproc_per_node or recipe.nproc_per_node
    else:
        nodes, gpus, per_node = cluster.layout(TASKS[args.task], recipe)
    checks.check_layout(nodes, per_node, tp, pp, cfg.run.prompts_per_step)
    checks.check_replicas_per_node(nodes, per_node, engine_tensor_parallel_size(cfg))
    if gpus:
        _check_memory(args, cfg, recipe, nodes, gpus)
    if container:
        roots = [code_dir, *([PACKAGED_CODE_DIR] if cluster.package_code else [])]
        values = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in PATH_KEYS}
        checks.check_job_paths(values, cluster.mount_targets, roots, OUTPUT_KEYS)
    stop_signals = getattr(cfg.run, "stop_signals", None)  # run.stop_signals: the trainer's graceful stop
    if stop_signal and stop_signals is not None and stop_signal.name not in stop_signals:
        raise LaunchError(f"--signal {stop_signal.sbatch_value()}: the trainer stops only on "
                          f"run.stop_signals={list(stop_signals)}; add {stop_signal.name} or change --signal")
    return paths, recipe


def _check_memory(args: argparse.Namespace, cfg: object, recipe: Recipe, nodes: int, gpus: int) -> None:
    from trapo_megatron.plan.memory import GPUS
    from trapo_megatron.plan.run import model_of

    if args.gpu not in GPUS:
        raise LaunchError(f"--gpu {args.gpu!r} is unknown; choose one of {sorted(GPUS)}")
    try:
        spec = model_of(cfg, recipe.planner_model)
    except ValueError as e:
        raise LaunchError(f"model.hf_path={cfg.model.hf_path}: {e}") from None
    if spec is None:
        print(f"trapo launch: warning: memory not checked: {cfg.model.hf_path}/config.json is not readable here",
              file=sys.stderr)
        return
    warning = checks.check_memory(cfg, spec, args.gpu, nodes, gpus)
    if warning and args.strict:
        raise LaunchError(f"{warning} (--strict)")
    if warning:
        print(f"trapo launch: warning: {warning}", file=sys.stderr)


def plan_launch(args: argparse.Namespace) -> Plan:
    """Everything checked before NeMo-Run is imported; LaunchError (exit 2) when the launch cannot work."""
    task = TASKS[args.task]
    recipe = _recipe(args, task)
    env = _pairs("--env", args.env)
    over_ssh = args.executor == "slurm" and bool(args.ssh)
    checks.check_env(env, args.env_from_host, None if over_ssh else dict(os.environ))
    local = args.executor == "local"
    shipped = args.package_code and not local
    cluster = None
    if not local:
        try:
            cluster = ClusterSettings(
                account=args.account or "", partition=args.partition, time=args.time, nodes=args.nodes,
                gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node, container_image=args.container_image, mounts=args.mount,
                env=env, env_from_host=_from_host(args.env_from_host, over_ssh), job_dir=args.job_dir, ssh=args.ssh,
                ssh_identity=args.ssh_identity,
                package_code=shipped, python=args.python, qos=args.qos, gres=args.gres, mem=args.mem,
                constraint=args.constraint, exclude=args.exclude, srun_args=args.srun_args,
                container_env=args.container_env, retries=args.retries, signal=args.signal, chain=args.chain,
                after=args.after,
                additional_parameters=_pairs("--additional-parameter", args.additional_parameter))
        except ValueError as e:
            raise LaunchError(str(e)) from None
        checks.check_nodes(args.task, task.distributed, cluster.layout(task, recipe)[1], args.nodes,
                           args.nproc_per_node)
    in_container = bool(cluster and cluster.container_image)
    default_dir = PACKAGED_CODE_DIR if shipped and in_container else IMAGE_CODE_DIR if in_container else str(REPO_ROOT)
    code_dir = args.code_dir or default_dir
    if shipped:
        env.setdefault("PYTHONPATH", PACKAGED_CODE_DIR)
    stop_signal = None
    if cluster is not None:
        limit = checks.parse_time(cluster.time or recipe.time)
        stop_signal = checks.parse_signal(cluster.signal, limit) if task.stops_on_signal else None
    user_configs = [Path(c).resolve() for c in args.config]
    missing = [str(c) for c in user_configs if not c.is_file()]
    if missing:
        raise LaunchError(f"--config {missing[0]}: no such file")
    extra = list(args.task_args)
    job_configs: tuple[str, ...] = ()
    if task.uses_config:
        local_configs = [str(REPO_ROOT / c) for c in recipe.configs] + [str(c) for c in user_configs]
        paths, recipe = _check_train(args, recipe, code_dir, cluster, local_configs, extra, stop_signal)
        extra += paths
        job_configs = tuple(_job_config_path(c, code_dir, cluster) for c in user_configs)
    argv = task_args(recipe if args.recipe else None, task, code_dir, extra, configs=job_configs)
    base = args.recipe or (Path(args.config[0]).stem if args.config else "trapo")
    name = args.name or f"{base}-{args.task}".replace(".", "_")
    return Plan(recipe=recipe, task=task, argv=argv, cluster=cluster, stop_signal=stop_signal, name=name)


def run_launch(args: argparse.Namespace) -> int:
    """Check, build the task and executor, then dry-run, submit or run it; non-zero when the task failed."""
    try:
        plan = plan_launch(args)
    except LaunchError as e:
        print(f"trapo launch: {e}", file=sys.stderr)
        return 2

    from trapo_megatron.launch import executors  # imports nemo_run (seconds): only now

    if plan.cluster is None:
        executor = executors.local_executor(plan.task, plan.recipe, args.nproc_per_node, _pairs("--env", args.env))
        if args.dryrun:
            print(" ".join(["python", "-m", plan.task.module, *plan.argv]))
            return 0
        script = executors.script_task(plan.task, plan.argv)
    else:
        executor = executors.slurm_executor(plan.task, plan.recipe, plan.cluster, plan.stop_signal)
        script = executors.slurm_task(plan.task, plan.argv, plan.recipe, plan.cluster, plan.stop_signal)
    try:
        if args.dryrun:
            print(executors.sbatch_script(script, executor, plan.name))
            return 0
        if plan.cluster is None:
            return executors.run_experiment(script, executor, plan.name)
        if plan.cluster.ssh and plan.cluster.env_from_host:
            missing = checks.missing_on_login_node(executors.exit_status(executor.tunnel), plan.cluster.env_from_host)
            if missing:
                print(f"trapo launch: --env-from-host {missing[0]}: not set in the sessions of the login node "
                      f"{plan.cluster.ssh} (sbatch runs there and the job inherits that environment); set it there, "
                      "e.g. in the shell's startup file", file=sys.stderr)
                return 2
        return executors.run_slurm(script, executor, plan.name, chain=plan.cluster.chain, detach=args.detach)
    except Exception as e:  # noqa: BLE001 - NeMo-Run's own errors (no sbatch, ssh, torchrun) end the launch
        print(f"trapo launch: NeMo-Run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trapo launch", description=__doc__.splitlines()[0])
    add_launch_arguments(parser)
    return run_launch(parser.parse_args(argv))
