"""Training state out of accelerator memory while the colocated engine runs, and back before training.

What moves (``engine.offload_during_rollout``):
  "grads"            the DDP grad buffers (every ``param.main_grad`` is a view into one of them);
  "grads+optimizer"  also the optimizer's state: Adam's exp_avg / exp_avg_sq and, under bf16, the fp32
                     master copies of the distributed optimizer's shard. Storage shared with the model's
                     parameters (fp32 runs: the master params ARE the parameters) stays: the weights are
                     the source of the weight sync and the engine's refit.

How: each storage is copied byte for byte into a host buffer (pinned when CUDA is present, so the copies
are DMA transfers) and then resized to 0 bytes, which returns the memory to the allocator while every view
(main_grad, bucket.grad_data, optimizer state entries) stays a valid tensor object; restoring resizes the
storage back and copies the bytes in. The round trip is bit-identical. megatron-core's own
``offload_grad_buffers`` zeroes the grads on reload and its optimizer offload only acts on CUDA tensors, so
neither can be checked on a CPU; this one can (the storages really shrink to 0 there too).
"""

from __future__ import annotations

from typing import Any

import torch

from trapo_megatron.megatron import platform
from trapo_megatron.offload_modes import OffloadMode


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def grad_buffers(ddp_chunks: list[Any]) -> list[torch.Tensor]:
    """The DDP grad buffers of every chunk (dense and expert-parallel)."""
    return [b.grad_data for c in ddp_chunks
            for b in [*c.buffers, *getattr(c, "expert_parallel_buffers", [])] if b.grad_data is not None]


def optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor the (chained) megatron optimizer owns: per-parameter state and its master params."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            out += [p for p in group["params"] if isinstance(p, torch.Tensor)]
        for state in inner.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return out


class TrainingStateOffload:
    """Moves the configured part of the training state to host memory and back (idempotent both ways)."""

    def __init__(self, mode: OffloadMode, ddp_chunks: list[Any], optimizer: Any) -> None:
        self.mode = mode
        self.chunks = ddp_chunks
        self.optimizer = optimizer
        self._held: list[tuple[torch.UntypedStorage, torch.Tensor]] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._held)

    def _tensors(self) -> list[torch.Tensor]:
        if self.mode == "none":
            return []
        tensors = grad_buffers(self.chunks)
        if self.mode == "grads+optimizer":
            weights = {_storage_key(p) for c in self.chunks for p in c.parameters()}
            tensors += [t for t in optimizer_tensors(self.optimizer) if _storage_key(t) not in weights]
        return tensors

    @torch.no_grad()
    def offload(self) -> int:
        """Copy the state to host memory and free its device storage; returns the bytes moved."""
        if self._held:
            return 0
        seen: set[int] = set()
        pin = platform.cuda_available()
        for t in self._tensors():
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or _storage_key(t) in seen:
                continue
            seen.add(_storage_key(t))
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
            host.untyped_storage().copy_(storage, non_blocking=pin)
            self._held.append((storage, host))
        if pin:
            torch.cuda.synchronize()  # the copies must land before the storages are freed
        for storage, _ in self._held:
            storage.resize_(0)
        return sum(h.numel() for _, h in self._held)

    @torch.no_grad()
    def restore(self) -> None:
        """Reallocate every offloaded storage and copy its bytes back."""
        for storage, host in self._held:
            storage.resize_(host.numel())
            storage.copy_(host.untyped_storage(), non_blocking=host.is_pinned())
        if self._held and platform.cuda_available():
            torch.cuda.synchronize()
        self._held = []
