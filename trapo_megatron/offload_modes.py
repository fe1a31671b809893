"""What leaves the GPU while the rollout engine runs: the choices of ``engine.offload_during_rollout``.

A neutral, dependency-free module: the trainer (megatron/offload.py moves the memory) and the planner
(plan/memory.py sizes what stays) read the same list.
"""

from __future__ import annotations

from typing import Literal, get_args

OffloadMode = Literal["none", "grads", "grads+optimizer"]
"""none; grads: the DDP grad buffers; grads+optimizer: also the optimizer states and fp32 master copies."""
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)
