"""Fault injection for the reliability tests; inert unless the environment sets ``TRAPO_FAULT``.

``TRAPO_FAULT="<point>:<steps>[:<action>[:<rank>]]"``, several joined by ``,``:
  point   where the run calls :func:`fire` (see ``POINTS``);
  steps   ``3`` or ``3-5`` (inclusive), the training step(s) at which it fires;
  action  ``kill`` (default): SIGKILL this process's whole process group — a run whose ranks share one
          group (as the tests launch them) loses every process at once, like a node failure;
          ``term``: SIGTERM to this process (a graceful stop);
          ``nan``: :func:`fire` returns True and the caller poisons its value;
          ``sleep=<seconds>``: wait that long (a slow step: a job that must outlast its time limit however
          fast the machine);
  rank    fire only on this global rank (default: every rank).
"""

from __future__ import annotations

import os
import signal
import time

POINTS = ("step_start", "rollout", "loss", "optimizer", "mid_save", "after_latest")
"""step_start: before a step's rollout; rollout: engine awake, between waves (after each wave is graded, before
the next micro-groups are decided; the first wave's for a kill); loss: the
training loss (``nan``); optimizer: gradients reduced, before the update; mid_save: this rank's checkpoint
shards written, before the completion marker; after_latest: right after ``latest`` moved."""

_step = 0


def step_begins(step: int) -> None:
    """Record the training step that later :func:`fire` calls belong to."""
    global _step
    _step = step


def _parse(spec: str) -> list[tuple[str, int, int, str, int | None]]:
    out = []
    for item in filter(None, spec.split(",")):
        point, steps, *rest = item.split(":")
        if point not in POINTS:
            raise ValueError(f"TRAPO_FAULT: unknown point {point!r}; known: {POINTS}")
        first, _, last = steps.partition("-")
        action = rest[0] if rest else "kill"
        if action not in ("kill", "term", "nan") and not _seconds(action):
            raise ValueError(f"TRAPO_FAULT: unknown action {action!r} in {item!r}")
        rank = int(rest[1]) if len(rest) > 1 else None
        out.append((point, int(first), int(last or first), action, rank))
    return out


def _seconds(action: str) -> float | None:
    """The seconds of a ``sleep=<seconds>`` action (a positive number), else None."""
    name, _, value = action.partition("=")
    try:
        seconds = float(value) if name == "sleep" else None
    except ValueError:
        return None
    return seconds if seconds and seconds > 0 else None


def fire(point: str) -> bool:
    """Inject the fault configured for ``point`` at the current step; True iff it is a ``nan`` fault."""
    spec = os.environ.get("TRAPO_FAULT")
    if not spec:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for where, first, last, action, only in _parse(spec):
        if where != point or not first <= _step <= last or only not in (None, rank):
            continue
        if action == "kill":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "nan":
            return True
        else:
            time.sleep(_seconds(action))
    return False
