"""NeMo-Run factories: the task (a ``python -m`` script), the local and Slurm executors, and running an
experiment so that a failed task becomes a non-zero exit code.

NeMo-Run facts this module is built on (0.11.1):
- ``run.Script`` needs ``entrypoint="python"``; with ``m=True`` the path is a module.
- A Torchrun launcher on a SlurmExecutor sets ntasks_per_node=1 and torchrun_nproc_per_node=<GPUs>.
- A failed task does not raise and ``Experiment.run`` returns normally: the status must be read after the
  experiment's context exits (it waits for the tasks there).
- The local scheduler resolves ``torchrun`` and ``python`` on the PATH it is given: this interpreter's
  bin directory goes first, so the venv's tools run.
- NEMORUN_HOME (default ~/.nemo_run) is read once, when nemo_run is imported: set it before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import nemo_run as run

from trapo_megatron.launch.recipes import (
    DEFAULT_ENV,
    IMAGE_CODE_DIR,
    TASKS,
    ClusterSettings,
    Recipe,
    Task,
    get_recipe,
    task_args,
)

LOG_TAIL_LINES = 100
"""Lines of a failed local task's log echoed to stderr."""


def script_task(task: Task, args: list[str], env: dict[str, str] | None = None) -> run.Script:
    """``python -m <module> <args>`` as a NeMo-Run script task."""
    return run.Script(path=task.module, m=True, entrypoint="python", args=list(args), env=dict(env or {}))


def local_executor(task: Task, recipe: Recipe, nproc_per_node: int | None = None,
                   env: dict[str, str] | None = None) -> run.LocalExecutor:
    """This machine: torchrun with the recipe's processes per node for distributed tasks."""
    bindir = os.path.dirname(sys.executable)
    env_vars = {**DEFAULT_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    if recipe.gpus_per_node == 0:
        env_vars.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the cores
    if not task.distributed:
        return run.LocalExecutor(ntasks_per_node=1, env_vars=env_vars)
    nproc = nproc_per_node or recipe.nproc_per_node
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env_vars)


def slurm_executor(task: Task, recipe: Recipe, cluster: ClusterSettings) -> run.SlurmExecutor:
    """A Slurm job: the recipe's nodes (one node for single-process tasks), torchrun over the GPUs of every
    node, in the container, with the mounts and environment."""
    if not cluster.account:
        raise ValueError("--account is required for --executor slurm")
    if not cluster.container_image:
        raise ValueError("--container-image is required for --executor slurm (build it from the Dockerfile)")
    gpus = cluster.gpus_per_node or recipe.gpus_per_node
    nodes = (cluster.nodes or recipe.nodes) if task.distributed else 1
    job_dir = cluster.job_dir or os.path.join(os.environ.get("NEMORUN_HOME", "~/.nemo_run"), "slurm")
    if cluster.ssh:
        user, _, host = cluster.ssh.rpartition("@")
        tunnel: Any = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    executor = run.SlurmExecutor(
        account=cluster.account, partition=cluster.partition, time=cluster.time or recipe.time,
        nodes=nodes, ntasks_per_node=gpus if task.distributed else 1, gpus_per_node=gpus or None,
        container_image=cluster.container_image, container_mounts=list(cluster.mounts),
        env_vars={**DEFAULT_ENV, **cluster.env}, tunnel=tunnel,
        packager=run.GitArchivePackager() if cluster.package_code else run.Packager(),
        job_name_prefix="trapo-", exclusive=True if task.distributed else None,
    )
    if task.distributed:
        executor.launcher = "torchrun"
    return executor


def recipe_task(recipe: str, task: str = "train", args: list[str] | None = None,
                code_dir: str = IMAGE_CODE_DIR) -> run.Script:
    """The NeMo-Run task of a recipe, for your own NeMo-Run scripts:

        task = recipe_task("qwen2.5-32b", args=["model.hf_path=/models/Qwen2.5-32B"])
        executor = recipe_executor("qwen2.5-32b", cluster=ClusterSettings(account=..., container_image=...))
        run.run(task, executor=executor)
    """
    return script_task(TASKS[task], task_args(get_recipe(recipe), TASKS[task], code_dir, list(args or [])))


def recipe_executor(recipe: str, task: str = "train", cluster: ClusterSettings | None = None,
                    nproc_per_node: int | None = None) -> run.Executor:
    """The recipe's Slurm executor for ``cluster``; its local torchrun executor when ``cluster`` is None."""
    if cluster is None:
        return local_executor(TASKS[task], get_recipe(recipe), nproc_per_node)
    return slurm_executor(TASKS[task], get_recipe(recipe), cluster)


def sbatch_script(task: run.Script, executor: run.SlurmExecutor, name: str) -> str:
    """The sbatch script Slurm would receive, generated without a cluster. NeMo-Run's own log lines go to
    stderr, so stdout carries the script alone (``trapo launch ... --dryrun > job.sbatch``)."""
    quiet = contextlib.redirect_stdout(sys.stderr)
    with quiet, run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.dryrun(log=False)
        return exp.jobs[0]._dryrun_info.request.materialize()


def run_experiment(task: run.Script, executor: run.Executor, name: str, detach: bool = False) -> int:
    """Run one task; 0 when it succeeded (or was submitted, detached), 1 when it failed."""
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name, tail_logs=False)
        exp.run(sequential=True, detach=detach)
    # the context exit waits for a non-detached task: only now is its final state known
    status = exp.status(return_dict=True) or {}
    failed = []
    for task_name, info in status.items():
        status_value = info.get("status", "")
        state = str(getattr(status_value, "name", status_value)).upper()  # torchx AppState
        if state in ("FAILED", "CANCELLED", "UNKNOWN") or (not detach and state != "SUCCEEDED"):
            failed.append((task_name, state, info.get("local_dir", "")))
        elif detach:
            print(f"trapo launch: {task_name!r} {state.lower()} as job {info.get('job_id')} "
                  f"(experiment {getattr(exp, '_id', name)})", file=sys.stderr)
    for task_name, state, where in failed:
        print(f"trapo launch: task {task_name!r} {state.lower()}; logs in {where}", file=sys.stderr)
        for log in sorted(Path(where).glob("**/combined.log")) if where else []:
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print(f"--- last lines of {log}:", *tail, sep="\n", file=sys.stderr)
    return 1 if failed or not status else 0
