"""torchrun for Slurm jobs, with the stop signals left to the trainer.

    python -m trapo_megatron.launch.agent [--stop-signal SIGUSR1 ...] [--node-rank-from SLURM_NODEID] <torchrun arguments>

Slurm warns a job before its time limit with ``--signal=USR1@N`` and ends it (limit, ``scancel``,
``scontrol requeue``, preemption) with SIGTERM, then SIGKILL after KillWait. Without a step-level ``B:``,
slurmstepd signals every process of the step (proctrack/cgroup: the step's cgroup; proctrack/linuxproc:
the process tree), so the workers receive the signal themselves; the trainer traps it, finishes the step,
saves a checkpoint and exits with EXIT_STOPPED. Plain torchrun gets in the way twice:

- SIGUSR1's default action kills the agent, and the step with it (``srun --kill-on-bad-exit``): here the
  agent ignores the warning signals, and its workers inherit the ignore (exec keeps SIG_IGN), so a warning
  that arrives while a worker is still importing is dropped instead of killing it; the trainer's own
  handler replaces the ignore once the loop runs, and the time limit's SIGTERM still follows.
- On SIGTERM torch elastic terminates the workers and SIGKILLs them 30 s later
  (torch/distributed/elastic/multiprocessing/api.py, ``PContext.close``), too soon to finish a large
  step: here the agent only passes SIGTERM on to its workers (harmless when Slurm already did) and keeps
  watching them. torchrun's ``--signals-to-handle`` keeps torch from installing its handler over ours: the
  launcher writes it into ``TORCHELASTIC_SIGNALS_TO_HANDLE`` (torch/distributed/launcher/api.py, overwriting
  any value set before), which ``PContext.start`` reads (torch/distributed/elastic/multiprocessing/api.py).

On several nodes ``--node-rank-from SLURM_NODEID`` gives torchrun ``--node-rank`` from the task's own
environment: srun sets SLURM_NODEID per node, while a ``$SLURM_NODEID`` in the job script would expand in the
batch shell, to 0 on every node.

When every failed worker exited with EXIT_STOPPED, the agent exits with EXIT_STOPPED too (not torchrun's
1), so the job's exit code says "stopped, resumable" and NeMo-Run's sbatch script requeues it while
``--retries`` lasts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# A dependency of dist_checkpointing, always installed with megatron-core. Imported here, not in the signal
# handler: a handler that imports while the main thread is importing psutil sees a partial module (seen under
# Slurm's time limit: "partially initialized module 'psutil' has no attribute 'Process'").
import psutil

TORCH_HANDLED = ("SIGINT", "SIGHUP", "SIGQUIT")
"""Signals torch elastic keeps handling (terminate the workers): the stop signals are ours."""


def _forward_to_workers(signum: int, _frame: object) -> None:
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def protect(stop_signals: list[str]) -> list[str]:
    """Install the agent's dispositions before torch elastic starts the workers; returns the torchrun flag
    that leaves the stop signals to them."""
    for name in stop_signals:
        sig = signal.Signals[name]
        signal.signal(sig, _forward_to_workers if sig == signal.SIGTERM else signal.SIG_IGN)
    return [f"--signals-to-handle={','.join(s for s in TORCH_HANDLED if s not in stop_signals)}"]


def stopped_cleanly(exit_codes: set[int]) -> bool:
    """Whether the failed workers' exit codes mean a graceful stop.

    A worker exits EXIT_STOPPED only after the stop's checkpoint is committed on every rank (the commit ends
    in a barrier). The first such exit makes torch elastic stop the group: it SIGTERMs the workers still
    shutting down, which then report -SIGTERM. So at least one EXIT_STOPPED and nothing but -SIGTERM besides
    is a clean stop; any other code is a failure.
    """
    from trapo_megatron.train.stopping import EXIT_STOPPED

    return EXIT_STOPPED in exit_codes and exit_codes <= {EXIT_STOPPED, -signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trapo_megatron.launch.agent", add_help=False)
    parser.add_argument("--stop-signal", action="append", default=[], dest="stop_signals",
                        help="a signal the trainer stops on (repeat); SIGTERM is always one")
    parser.add_argument("--node-rank-from", default=None, metavar="NAME",
                        help="torchrun's --node-rank from this environment variable (e.g. SLURM_NODEID)")
    args, torchrun_args = parser.parse_known_args(argv)
    if args.node_rank_from:
        node_rank = os.environ.get(args.node_rank_from, "")
        if not node_rank.isdigit():
            parser.error(f"--node-rank-from {args.node_rank_from}: it is {node_rank or 'not set'}, not a node rank")
        torchrun_args = ["--node-rank", node_rank, *torchrun_args]
    stop_signals = sorted({"SIGTERM", *args.stop_signals})
    bad = [s for s in stop_signals if s not in signal.Signals.__members__ or s in TORCH_HANDLED + ("SIGKILL",)]
    if bad:
        parser.error(f"--stop-signal {bad[0]}: not a signal a trainer can stop on")
    torch_flags = protect(stop_signals)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from trapo_megatron.train.stopping import EXIT_STOPPED

    try:
        torchrun(torch_flags + torchrun_args)
    except ChildFailedError as e:
        if stopped_cleanly({failure.exitcode for failure in e.failures.values()}):
            # On several nodes the first agent to exit 75 makes srun (--kill-on-bad-exit) SIGTERM the others,
            # which have stopped too and are on their way out; at interpreter exit Python restores SIGTERM's
            # default action, and the SIGTERM then killed an agent after this line (seen: job exit code 143, not
            # 75, on two nodes). Ignored from here on: the agent's exit code is the stop's.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"trapo agent: every worker stopped on a signal after a checkpoint (exit {EXIT_STOPPED})",
                  file=sys.stderr, flush=True)
            return EXIT_STOPPED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
