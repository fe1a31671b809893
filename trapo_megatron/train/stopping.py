"""Graceful stop: a listed signal (``run.stop_signals``) on ANY rank makes EVERY rank finish the current
step, save a checkpoint, move ``latest`` and exit with :data:`EXIT_STOPPED`.

The handler only sets a flag (nothing else is safe inside a signal handler, and a rank may be in the middle
of a collective). At each step boundary every rank calls :meth:`StopSignals.agreed`: a MAX all-reduce of the
flag over ``platform.host_group()``, so a signal delivered to one rank only (Slurm's ``--signal`` to one
task, a ``kill`` by hand) stops them all at the same step.

Launchers: torchrun's agent forwards SIGTERM (and whatever ``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists, e.g.
add SIGUSR1) to each worker's process group and SIGKILLs the workers after its shutdown timeout
(``--shutdown_timeout`` / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default): leave that longer than one
step plus one checkpoint save.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.megatron import platform

EXIT_STOPPED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: "try again", i.e.
resume); a requeueing launcher tells it apart from success (0) and failure (anything else)."""

_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signals(names: tuple[str, ...], knob: str = "run.stop_signals") -> list[signal.Signals]:
    """Signal names (``"SIGTERM"``) -> signals; ValueError naming ``knob`` for an unknown or uncatchable one."""
    out = []
    for name in names:
        if name in _UNCATCHABLE or name not in signal.Signals.__members__:
            raise ValueError(f"{knob}: {name!r} is not a catchable signal name (e.g. 'SIGTERM', 'SIGUSR1')")
        out.append(signal.Signals[name])
    return out


class StopSignals:
    """Installs flag-setting handlers for ``names`` (restored by :meth:`close`)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.received: str | None = None
        """Name of the first stop signal this rank received (None: none yet)."""
        self._previous: dict[signal.Signals, Any] = {}
        for sig in parse_signals(names):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(f"trapo: rank {rank} received {self.received}; stopping after the current step", file=sys.stderr,
                  flush=True)

    def agreed(self) -> bool:
        """True on every rank iff any rank received a stop signal (collective over the host group)."""
        flag = torch.tensor([float(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=platform.host_group())
        return bool(flag.item())

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


EXIT_DIVERGED = 3
"""Exit status of a run stopped by ``run.max_consecutive_skips`` non-finite steps in a row; ``latest`` is
the last checkpoint saved before them (resuming it repeats the same steps: change something first)."""


class DivergedError(RuntimeError):
    """Too many consecutive optimizer steps skipped for a non-finite loss or gradient norm."""


class SkipGuard:
    """Counts optimizer steps skipped by the numerical guard (``update_skipped``) and stops the run after
    ``max_consecutive`` in a row. Its counters are part of the trainer state a checkpoint carries."""

    def __init__(self, max_consecutive: int, state: dict[str, int] | None = None) -> None:
        self.max_consecutive = max_consecutive
        self.num_skipped_total = int((state or {}).get("num_skipped_total", 0))
        self.num_consecutive = int((state or {}).get("num_consecutive_skips", 0))

    def update(self, step: int, skipped: bool, reason: str) -> None:
        """Count step ``step`` (``reason``: the non-finite quantity of a skipped step)."""
        if not skipped:
            self.num_consecutive = 0
            return
        self.num_skipped_total += 1
        self.num_consecutive += 1
        if dist.get_rank() == 0:
            print(f"trapo: step {step}: non-finite {reason}; optimizer step skipped on every rank "
                  f"({self.num_consecutive} in a row, {self.num_skipped_total} in total)", file=sys.stderr,
                  flush=True)

    def check(self, step: int) -> None:
        """DivergedError once ``max_consecutive`` steps in a row were skipped (call before saving ``step``)."""
        if self.max_consecutive and self.num_consecutive >= self.max_consecutive:
            raise DivergedError(
                f"step {step}: {self.num_consecutive} consecutive optimizer steps skipped for a non-finite "
                f"loss or gradient norm (run.max_consecutive_skips={self.max_consecutive}); the last good "
                f"checkpoint is still `latest`: lower optimizer.lr or check the data before resuming")

    def state_dict(self) -> dict[str, int]:
        return {"num_skipped_total": self.num_skipped_total, "num_consecutive_skips": self.num_consecutive}
