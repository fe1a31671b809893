"""NeMo-Run factories: the task (a ``python -m`` script), the local and Slurm executors, and running an
experiment so that a failed task becomes a non-zero exit code.

NeMo-Run facts this module is built on (0.11.1):
- ``run.Script`` needs ``entrypoint="python"``; with ``m=True`` the path is a module.
- A SlurmExecutor joins a Script's arguments unquoted into the sbatch script ($variables expand in the job);
  without a container it runs ``srun --chdir <job dir>/code`` and rewrites every "/nemo_run" of the script.
- Its sbatch script requeues itself after a non-zero exit while SLURM_RESTART_COUNT < TORCHX_MAX_RETRIES
  (``retries``) and always submits with --requeue.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nemo_run as run

from trapo_megatron.launch import slurm_jobs
from trapo_megatron.launch.checks import SlurmSignal, parse_signal, parse_time
from trapo_megatron.launch.recipes import (
    DEFAULT_ENV,
    IMAGE_CODE_DIR,
    RENDEZVOUS_PORT,
    TASKS,
    ClusterSettings,
    Recipe,
    Task,
    get_recipe,
    task_args,
)

LOG_TAIL_LINES = slurm_jobs.LOG_TAIL_LINES


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


def tunnel(cluster: ClusterSettings) -> Any:
    """Where sbatch runs. A LocalTunnel's job_dir must be where NeMo-Run writes the sbatch script
    (NEMORUN_HOME/experiments): it copies nothing and submits ``tunnel.job_dir/<job>_sbatch.sh``
    (run/torchx_backend/schedulers/slurm.py, schedule; NVIDIA-NeMo/Run#299). An SSHTunnel rsyncs the
    experiment into its job_dir first."""
    if cluster.ssh:
        user, host, port = cluster.ssh_target
        return run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), port=port,
                             identity=cluster.ssh_identity or None, job_dir=cluster.job_dir)
    if cluster.job_dir:
        run.config.set_nemorun_home(cluster.job_dir)
    return run.LocalTunnel(job_dir=os.path.join(os.path.abspath(run.config.get_nemorun_home()), "experiments"))


def slurm_task(task: Task, args: list[str], recipe: Recipe, cluster: ClusterSettings,
               stop_signal: SlurmSignal | None) -> run.Script:
    """The job's command. Distributed tasks run torchrun through :mod:`trapo_megatron.launch.agent`, one per
    node (rendezvous on the first node), so that the stop signals reach the trainer and not torchrun."""
    python = cluster.python or ("python" if cluster.container_image else sys.executable)
    if not task.distributed:
        return run.Script(path=task.module, m=True, entrypoint=python, args=list(args))
    nodes, _, per_node = cluster.layout(task, recipe)
    agent = [f"--stop-signal={stop_signal.name}"] if stop_signal and task.stops_on_signal else []
    if nodes == 1:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "$SLURM_JOB_ID"]
    else:
        # torchrun's static rendezvous on the first node, whose address NeMo-Run's script looks up
        # ($head_node_ip), every node at the rank Slurm gave it. The arguments are joined unquoted into the
        # sbatch script: $variables expand in the batch shell, the same on every node, so the node rank is
        # read by the agent from the environment srun gives each task (SLURM_NODEID).
        agent.append("--node-rank-from=SLURM_NODEID")
        rendezvous = ["--master-addr", f"${run.SlurmExecutor.HEAD_NODE_IP_VAR}", "--master-port",
                      str(RENDEZVOUS_PORT)]
    torchrun = ["--nnodes", str(nodes), "--nproc-per-node", str(per_node), *rendezvous, "--max-restarts", "0"]
    return run.Script(path="trapo_megatron.launch.agent", m=True, entrypoint=python,
                      args=[*agent, *torchrun, "-m", task.module, *args])


def slurm_executor(task: Task, recipe: Recipe, cluster: ClusterSettings,
                   stop_signal: SlurmSignal | None = None) -> run.SlurmExecutor:
    """A Slurm job: the recipe's nodes (one node for single-process tasks), one task per node, the GPUs
    (or CPUs) of every node, in the container when there is one, with the mounts, the environment, the
    requeue budget and the warning signal."""
    nodes, gpus, per_node = cluster.layout(task, recipe)
    env = {**DEFAULT_ENV, **({} if gpus else {"OMP_NUM_THREADS": "1"}), **cluster.env}
    extra = dict(cluster.additional_parameters)
    # names only: the job inherits the values from sbatch's environment (--export=ALL), and stops at once
    # when one is missing instead of hours later. The check never expands a value: NeMo-Run's sbatch template
    # runs under `set -x`, which would print it into the job's log (seen with `: "${NAME:?...}"`).
    setup = [f'[ -n "${{{name}+set}}" ] || {{ echo "{name} is not set where sbatch ran '
             f'(--env-from-host {name})" >&2; exit 1; }}' for name in cluster.env_from_host]
    if cluster.env_from_host:
        extra.setdefault("export", "ALL")
    if cluster.after:
        extra["dependency"] = f"afterany:{cluster.after}"
    return run.SlurmExecutor(
        account=cluster.account or None, partition=cluster.partition, qos=cluster.qos, gres=cluster.gres,
        mem=cluster.mem, constraint=cluster.constraint, exclude=cluster.exclude,
        time=cluster.time or recipe.time, nodes=nodes, ntasks_per_node=1, gpus_per_node=gpus or None,
        cpus_per_task=None if gpus else per_node,
        signal=stop_signal.sbatch_value() if stop_signal and task.stops_on_signal else None,
        container_image=cluster.container_image or None, container_mounts=list(cluster.mounts),
        container_env=list(cluster.container_env) or None, srun_args=list(cluster.srun_args) or None,
        additional_parameters=extra or None, env_vars=env, tunnel=tunnel(cluster),
        packager=run.GitArchivePackager() if cluster.package_code else run.Packager(),
        job_name_prefix="trapo-", exclusive=True if task.distributed and gpus else None,
        retries=cluster.retries, setup_lines="\n".join(setup) or None, dependency_type="afterany",
    )


def recipe_task(recipe: str, task: str = "train", args: list[str] | None = None,
                code_dir: str = IMAGE_CODE_DIR, cluster: ClusterSettings | None = None) -> run.Script:
    """The NeMo-Run task of a recipe, for your own NeMo-Run scripts (``cluster``: the Slurm job's command,
    torchrun through the stop-signal agent; None: ``python -m`` for a local torchrun executor):

        cluster = ClusterSettings(account=..., container_image=...)
        task = recipe_task("qwen2.5-32b", args=["model.hf_path=/models/Qwen2.5-32B"], cluster=cluster)
        run.run(task, executor=recipe_executor("qwen2.5-32b", cluster=cluster))
    """
    r, t = get_recipe(recipe), TASKS[task]
    argv = task_args(r, t, code_dir, list(args or []))
    if cluster is None:
        return script_task(t, argv)
    return slurm_task(t, argv, r, cluster, default_signal(cluster, r))


def default_signal(cluster: ClusterSettings, recipe: Recipe) -> SlurmSignal | None:
    return parse_signal(cluster.signal, parse_time(cluster.time or recipe.time))


def recipe_executor(recipe: str, task: str = "train", cluster: ClusterSettings | None = None,
                    nproc_per_node: int | None = None) -> run.Executor:
    """The recipe's Slurm executor for ``cluster``; its local torchrun executor when ``cluster`` is None."""
    r, t = get_recipe(recipe), TASKS[task]
    if cluster is None:
        return local_executor(t, r, nproc_per_node)
    return slurm_executor(t, r, cluster, default_signal(cluster, r))


def exit_status(via: Any) -> Callable[[str], int]:
    """``command`` -> its exit status where the tunnel runs commands (the login node over ssh)."""
    return lambda command: via.run(command, hide=True, warn=True).return_code


def _chained(exp: run.Experiment, task: run.Script, executor: run.Executor, name: str, chain: int) -> None:
    """``chain`` copies of the job, each depending on the previous one (the executor's dependency_type; NeMo-Run
    writes it). A dependency of the job's own (``--after``) stays with the first link."""
    for i in range(chain):
        link = executor
        if i:
            link = executor.clone()
            link.additional_parameters = {k: v for k, v in (link.additional_parameters or {}).items()
                                          if k != "dependency"} or None
        exp.add(task, executor=link, name=f"{name}-{i}" if chain > 1 else name, tail_logs=False)


def sbatch_script(task: run.Script, executor: run.SlurmExecutor, name: str) -> str:
    """The sbatch script Slurm would receive, generated without a cluster. NeMo-Run's own log lines go to
    stderr, so stdout carries the script alone (``trapo launch ... --dryrun > job.sbatch``)."""
    quiet = contextlib.redirect_stdout(sys.stderr)
    with quiet, run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.dryrun(log=False)
        return exp.jobs[0]._dryrun_info.request.materialize()


def run_slurm(task: run.Script, executor: run.SlurmExecutor, name: str, chain: int = 1,
              detach: bool = False) -> int:
    """Submit the job (``chain`` jobs, each after the previous ends), then follow them to the end.
    0 when the last one completed (or all were submitted, detached); 1 otherwise, with the logs' tails."""
    quiet = contextlib.redirect_stdout(sys.stderr)
    with quiet, run.Experiment(name, executor=executor, log_level="WARN") as exp:
        _chained(exp, task, executor, name, chain)
        exp.run(sequential=chain > 1, detach=True)
        jobs = [(job.handle.rstrip("/").split("/")[-1], job.executor) for job in exp.jobs]
    via = jobs[0][1].tunnel

    def sh(command: str) -> tuple[int, str]:
        result = via.run(command, hide=True, warn=True)
        return result.return_code, result.stdout

    ids = [job_id for job_id, _ in jobs]
    print(f"trapo launch: submitted job(s) {', '.join(ids)} (experiment {exp._id})", file=sys.stderr)
    if detach:
        return 0
    infos = slurm_jobs.wait(sh, ids)
    for info in infos:
        reason = f", reason {info.reason}" if info.reason not in ("", "None") else ""
        print(f"trapo launch: job {info.job_id} ended {info.state}, exit code {info.exit_code or '?'}, "
              f"{info.restarts} restart(s){reason}", file=sys.stderr)
    if infos[-1].succeeded:
        return 0
    for info, (job_id, ex) in zip(infos, jobs):
        if not info.succeeded:
            print(slurm_jobs.tail_logs(sh, os.path.join(ex.tunnel.job_dir, Path(ex.job_dir).name), job_id),
                  file=sys.stderr)
    return 1


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
