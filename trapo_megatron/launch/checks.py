"""Checks `trapo launch` runs before it submits anything: a job that cannot work fails here, in a second,
with one line naming the flag or key, instead of after its queue wait. Plain Python (no nemo_run).

Each check raises ``LaunchError``; the CLI prints it and exits 2.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any


class LaunchError(ValueError):
    """A launch that cannot work; the message names the flag or config key to change."""


# Slurm's --time formats (sbatch(1)): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME_FORMATS = [
    (re.compile(r"(?P<m>\d+)"), "minutes"),
    (re.compile(r"(?P<m>\d+):(?P<s>\d+)"), "minutes:seconds"),
    (re.compile(r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"), "hours:minutes:seconds"),
    (re.compile(r"(?P<d>\d+)-(?P<h>\d+)"), "days-hours"),
    (re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)"), "days-hours:minutes"),
    (re.compile(r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"), "days-hours:minutes:seconds"),
]


def parse_time(text: str) -> int:
    """Seconds of a Slurm ``--time`` value."""
    for pattern, _ in _TIME_FORMATS:
        match = pattern.fullmatch(text.strip())
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
            if seconds <= 0:
                raise LaunchError(f"--time {text!r} must be longer than 0")
            return seconds
    formats = ", ".join(name for _, name in _TIME_FORMATS)
    raise LaunchError(f"--time {text!r} is not a Slurm time ({formats})")


@dataclass(frozen=True)
class SlurmSignal:
    """``--signal=NAME@SECONDS``: Slurm sends NAME to every process of the job's steps SECONDS before the
    time limit (up to a minute earlier: its timer runs every 30-60 s)."""

    name: str
    """Full signal name, e.g. SIGUSR1."""
    seconds: int

    def sbatch_value(self) -> str:
        return f"{self.name.removeprefix('SIG')}@{self.seconds}"


def parse_signal(text: str, limit_seconds: int) -> SlurmSignal | None:
    """``USR1@300`` (or ``SIGUSR1@300``); "" or "none": no signal."""
    if text.strip().lower() in ("", "none"):
        return None
    if text.startswith(("B:", "R:")):
        raise LaunchError(f"--signal {text!r}: give the signal without B:/R:; it must reach the training "
                          "processes (every step task), not only the batch shell")
    name, sep, seconds = text.partition("@")
    name = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        raise LaunchError(f"--signal {text!r}: {name} is not a signal the trainer can catch")
    if not sep or not seconds.isdigit() or int(seconds) < 1:
        raise LaunchError(f"--signal {text!r} must look like USR1@SECONDS (seconds before the time limit)")
    if int(seconds) >= limit_seconds:
        raise LaunchError(f"--signal {text!r}: {seconds} s before the limit is not inside the "
                          f"{limit_seconds} s --time")
    return SlurmSignal(name=name, seconds=int(seconds))


SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$")
"""Environment names whose values are credentials: never written into an sbatch script."""


def check_env(env: dict[str, str], from_host: list[str], host_env: dict[str, str] | None) -> None:
    """``--env`` carries no secret in clear; every ``--env-from-host`` name is set where we submit
    (``host_env`` None: over ssh, where :func:`missing_on_login_node` checks it instead)."""
    for key in env:
        if SECRET_NAME.search(key.upper()):
            raise LaunchError(f"--env {key}=... would write a secret into the sbatch script in clear; "
                              f"pass it by name: --env-from-host {key}")
    for name in from_host:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"--env-from-host {name!r} is not an environment variable name")
        if host_env is not None and name not in host_env:
            raise LaunchError(f"--env-from-host {name}: it is not set in this environment")


def missing_on_login_node(run: Callable[[str], int], names: list[str]) -> list[str]:
    """The ``--env-from-host`` names a login node's ssh session does not set. ``run(command)`` -> exit status
    there. Over ``--ssh`` sbatch runs in that session and the job inherits ITS environment (``--export=ALL``),
    not the one of the machine ``trapo launch`` runs on."""
    return [name for name in names if run(f"printenv {name} >/dev/null") != 0]


def check_layout(nodes: int, ranks_per_node: int, tp: int, pp: int, prompts_per_step: int) -> int:
    """The world splits into TP x PP model replicas and the step's prompts into DP shards; returns DP."""
    world, mp = nodes * ranks_per_node, tp * pp
    if world % mp:
        raise LaunchError(f"{nodes} node(s) x {ranks_per_node} rank(s) per node = {world} ranks is not a multiple "
                          f"of TP x PP = {tp} x {pp} = {mp}; change --nodes/--gpus-per-node or "
                          "parallel.tensor_model_parallel_size/pipeline_model_parallel_size")
    dp = world // mp
    if prompts_per_step % dp:
        raise LaunchError(f"run.prompts_per_step={prompts_per_step} does not divide over DP={dp} data-parallel "
                          f"ranks ({world} ranks / TP x PP {mp})")
    return dp


def check_nodes(task: str, distributed: bool, gpus_per_node: int, nodes: int | None,
                nproc_per_node: int | None) -> None:
    """``--nodes`` and ``--nproc-per-node`` fit the task: several nodes only for distributed tasks, ranks per
    node only for CPU jobs (a GPU job runs one rank per GPU)."""
    if nodes and nodes > 1 and not distributed:
        raise LaunchError(f"--nodes {nodes}: --task {task} runs one process on one node; drop --nodes")
    if nproc_per_node and gpus_per_node:
        raise LaunchError(f"--nproc-per-node {nproc_per_node}: a GPU job runs one rank per GPU "
                          f"({gpus_per_node} per node); change --gpus-per-node instead")


def check_replicas_per_node(nodes: int, ranks_per_node: int, engine_tp: int) -> None:
    """On several nodes every engine replica (``engine.tensor_parallel_size`` consecutive ranks) stays inside one
    node: a replica across nodes would run its tensor-parallel generation over the network."""
    if nodes > 1 and ranks_per_node % engine_tp:
        raise LaunchError(f"engine.tensor_parallel_size={engine_tp} does not divide the {ranks_per_node} rank(s) "
                          f"per node: an engine replica would span nodes; choose an engine TP that divides it")


def check_memory(cfg: Any, spec: Any, gpu: str, nodes: int, gpus_per_node: int) -> str | None:
    """The planner's verdict on the run ``cfg`` configures (plan/run.py, the same translation as `trapo plan
    --config`): None when it fits with headroom, else a one-line warning."""
    from trapo_megatron.plan.memory import GIB
    from trapo_megatron.plan.run import plan_run

    try:
        run = plan_run(cfg, spec, nodes * gpus_per_node, gpus_per_node, gpu)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    where = f"{spec.name} at {run.layout}"
    if run.fit is None:
        recompute = "" if cfg.model.recompute_activations else " (model.recompute_activations is off)"
        peak = run.memory.peak(cfg.model.recompute_activations) / GIB
        return (f"{where} does not fit a {gpu} as configured{recompute}: {peak:.1f} GiB of "
                f"{run.config.capacity_bytes / GIB:.1f} at {cfg.run.max_tokens_per_micro_batch} tokens per "
                f"micro-batch (see `trapo plan --config ... --gpus {nodes * gpus_per_node}`)")
    if run.fit.tight:
        peak = run.fit.memory.peak(run.fit.recompute) / GIB
        return (f"{where} leaves {run.fit.headroom:.0%} headroom on a {gpu} ({peak:.1f} GiB of "
                f"{run.fit.capacity / GIB:.1f})")
    return None


def under(path: str, roots: list[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots)


def check_job_paths(paths: dict[str, str | None], mount_targets: list[str], read_only_roots: list[str],
                    outputs: tuple[str, ...]) -> None:
    """In a container the job sees only the image and the mounts: every path must be under a mount
    destination; inputs may also be in the image's copy of the repository; outputs must be on a mount
    (the container's own files are gone when the job ends)."""
    for key, value in paths.items():
        if value is None:
            continue
        if key in outputs:
            if not under(value, mount_targets):
                raise LaunchError(f"{key}={value} is not under a --mount destination ({mount_targets or 'none'}): "
                                  "the run's output would be lost with the container")
        elif not under(value, mount_targets + read_only_roots):
            raise LaunchError(f"{key}={value} is not under a --mount destination ({mount_targets or 'none'}) "
                              f"nor the code directory ({', '.join(read_only_roots)})")
