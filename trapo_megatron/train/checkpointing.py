"""Checkpoints of a run, each a directory ``checkpoints/step_NNNNNN``:

- the Megatron distributed checkpoint of model + optimizer (moments and Adam step) + LR scheduler;
- ``rng_rankNNNNN.pt``: every RNG this rank draws from (python, numpy, torch, CUDA, Megatron's RNG tracker),
  tensors and plain values only, loaded with ``weights_only=True``;
- ``trainer_state.json``: the trainer's own state (step, skip counters);
- ``complete.json``: written by rank 0 after EVERY rank finished writing, before ``latest`` moves.

``checkpoints/latest`` names the newest complete one and is replaced atomically. A directory without its
completion marker (a kill mid-save) is never loaded, and is deleted before the same step is saved again.
The data order is a function of (seed, step) and the rollout seeds of (seed, step, position), so nothing
else decides the next steps: a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trapo_megatron import faults
from trapo_megatron.megatron import platform

LATEST = "latest"
COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"


def _rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if platform.cuda_available() else None,
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


class Checkpointer:
    def __init__(self, root: Path, policy: Any) -> None:
        self.root = root
        self.policy = policy

    @staticmethod
    def due(step: int, every: int, last: int) -> bool:
        return step == last or (every > 0 and step % every == 0)

    def directory(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int) -> None:
        """Every rank's shards and RNG states of ``step`` (collective); the step is not resumable before
        :meth:`commit`."""
        directory, rank = self.directory(step), dist.get_rank()
        if rank == 0 and directory.exists():
            shutil.rmtree(directory)  # a partial save of this step (killed run) or one being redone
        dist.barrier()
        self.policy.save(directory)
        torch.save(_rng_states(), directory / f"rng_rank{rank:05d}.pt")
        faults.fire("mid_save")

    def commit(self, step: int, trainer_state: dict[str, Any]) -> None:
        """Once every rank's :meth:`save` of ``step`` is done: (rank 0) the trainer state, the completion
        marker, then ``latest`` (collective)."""
        directory = self.directory(step)
        dist.barrier()
        if dist.get_rank() == 0:
            (directory / TRAINER_STATE).write_text(json.dumps(trainer_state) + "\n")
            (directory / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}) + "\n")
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(directory.name + "\n")
            os.replace(tmp, self.root / LATEST)
            faults.fire("after_latest")
        dist.barrier()

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names if it is complete; otherwise the newest complete one (None: none)."""
        pointer = self.root / LATEST
        if pointer.is_file():
            directory = self.root / pointer.read_text().strip()
            if is_complete(directory):
                return directory
            print(f"trapo: {directory} has no {COMPLETE} (a save that never finished); looking for the newest "
                  "complete checkpoint", file=sys.stderr)
        complete = sorted(d for d in self.root.glob("step_*") if is_complete(d))
        return complete[-1] if complete else None

    def resume(self) -> dict[str, Any] | None:
        """Restore the latest complete checkpoint; returns its trainer state (None when there is none)."""
        directory = self.latest()
        if directory is None:
            return None
        saved_world = json.loads((directory / COMPLETE).read_text())["world_size"]
        if saved_world != dist.get_world_size():
            raise ValueError(f"{directory} was saved by {saved_world} ranks, this run has "
                             f"{dist.get_world_size()}: resume with the same world size (or convert it)")
        self.policy.load(directory)
        _set_rng_states(torch.load(directory / f"rng_rank{dist.get_rank():05d}.pt", weights_only=True))
        state = json.loads((directory / TRAINER_STATE).read_text())
        if dist.get_rank() == 0:
            print(f"trapo: resuming from {directory} (step {state['step']})", file=sys.stderr, flush=True)
        return state
