"""Checkpoints of a run: checkpoints/step_NNNNNN (Megatron distributed checkpoint of model + optimizer +
scheduler, the trainer state, every rank's RNG states) and checkpoints/latest, rewritten atomically only
after a save completed on every rank, so a crash mid-save never leaves `latest` pointing at a partial one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


class Checkpointer:
    def __init__(self, root: Path, ctx: Any) -> None:
        self.root = root
        self.ctx = ctx

    @staticmethod
    def due(step: int, every: int, last: int) -> bool:
        return step == last or (every > 0 and step % every == 0)

    def save(self, step: int) -> Path:
        directory = self.root / f"step_{step:06d}"
        self.ctx.policy.save(directory, extra={"step": step})
        torch.save(_rng_states(), directory / f"rng_rank{dist.get_rank():05d}.pt")
        dist.barrier()
        if dist.get_rank() == 0:
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(directory.name + "\n")
            os.replace(tmp, self.root / LATEST)
        dist.barrier()
        return directory

    def resume(self) -> int:
        """Restore the latest complete checkpoint; returns its step (0 when there is none)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return 0
        directory = self.root / pointer.read_text().strip()
        extra = self.ctx.policy.load(directory)
        rng = directory / f"rng_rank{dist.get_rank():05d}.pt"
        if rng.is_file():
            _set_rng_states(torch.load(rng, weights_only=False))
        return int(extra["step"])
