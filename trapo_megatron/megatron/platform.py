"""The platform layer: torch.distributed + Megatron parallel state for any TP x PP x DP, seeding, and the
CPU compatibility layer.

On a CUDA machine this is a thin wrapper: NCCL, ``torch.cuda.set_device(LOCAL_RANK)`` and Megatron's own
``model_parallel_cuda_manual_seed``. Without CUDA, megatron-core 0.19 still runs over gloo once a handful of
CUDA calls are answered on the CPU. That layer lives here and nowhere else:

- global, installed by :func:`initialize` only when CUDA is unavailable and removed by :func:`destroy`:
  ``torch.cuda.current_device`` -> ``cpu`` (rotary embeddings, p2p and DDP buffers);
  ``torch.cuda.synchronize`` / ``current_stream`` -> no-ops (p2p, DDP grad sync, dist_checkpointing);
  an RNG tracker that forks the CPU generator with Megatron's seed offsets (attention always forks it);
- scoped, by :func:`cuda_literals_on_cpu` around the megatron calls that hard-code ``device="cuda"``
  (the pipeline schedules, the optimizer build/step, gradient clipping) and compare
  ``param.grad.type()`` with ``'torch.cuda.FloatTensor'``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


@dataclass(kw_only=True)
class ParallelConfig:
    """How the world is split. Data parallel size is what remains: world / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """TP: ranks that split each weight matrix (and the vocabulary of the logits)."""
    pipeline_model_parallel_size: int = 1
    """PP: ranks that split the stack of transformer layers into stages."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP for a world of ``world_size`` ranks; ValueError if TP x PP does not divide it."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
                f"parallel.pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size}"
            )
        return world_size // self.model_parallel_size


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_host_group: Any = None
"""A gloo group over the whole world when the default backend is NCCL (None: the default group is gloo)."""


def host_group() -> Any:
    """The process group for small host-side reductions (flags, counters, metrics): gloo over the whole world.

    Megatron's groups (TP/PP/DP/MP) are NCCL on GPU and carry only tensors on :func:`device`; CPU tensors
    reduced across ranks go through this group instead.
    """
    return _host_group if _host_group is not None else dist.group.WORLD


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (from the torchrun/env:// variables) and Megatron's parallel state, then seed.

    Idempotent for the process group; the Megatron parallel state is (re)built for ``parallel``.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", os.environ.get("TRAPO_MASTER_PORT", "29500"))
        backend = "nccl" if cuda_available() else "gloo"
        if cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    parallel.data_parallel_size(dist.get_world_size())  # validates the layout, names the knobs
    if not cuda_available():
        _install_cpu_compat()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state, the process group and the CPU compatibility layer."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _remove_cpu_compat()


def set_seed(seed: int) -> None:
    """Megatron-compatible seeding: ``seed + 100 * pp_rank`` for python/numpy/torch, then the model-parallel
    RNG tracker (data-parallel seed, tensor-parallel seed ``seed + 2718 + tp_rank``, expert seed)."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        _seed_cpu_rng_tracker(seed, parallel_state.get_tensor_model_parallel_rank())


# --------------------------------------------------------------------------------------------------
# CPU compatibility layer (applied only when CUDA is unavailable)
# --------------------------------------------------------------------------------------------------


class _NullStream:
    """Stands in for a CUDA stream: every ordering operation is trivially satisfied on the CPU."""

    def wait_stream(self, *_: Any) -> None: ...
    def wait_event(self, *_: Any) -> None: ...
    def record_event(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...


_CPU_ANSWERS = {
    "current_device": lambda: torch.device("cpu"),
    "synchronize": lambda *a, **k: None,
    "current_stream": lambda *a, **k: _NullStream(),
}
_saved_cuda_attrs: dict[str, Any] = {}


def _install_cpu_compat() -> None:
    for name, answer in _CPU_ANSWERS.items():
        if name not in _saved_cuda_attrs:
            _saved_cuda_attrs[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, answer)


def _remove_cpu_compat() -> None:
    for name, original in _saved_cuda_attrs.items():
        setattr(torch.cuda, name, original)
    _saved_cuda_attrs.clear()


def _seed_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """Install a tracker that forks CPU generator states, seeded with Megatron's offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(mrandom.get_data_parallel_rng_tracker_name(), seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom.get_expert_parallel_rng_tracker_name(), seed + 1024)


@functools.cache
def _cpu_rng_tracker_class() -> type:
    """Megatron's RNG tracker with the CPU generator in place of the CUDA one (built lazily: importing this
    module must not import megatron)."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG tracker: seed {seed} or state {name!r} already added")
            self._is_initialized = True
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise KeyError(f"RNG tracker state {name!r} was never added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.zeros_like,
    torch.ones_like, torch.empty_like, torch.full_like,
}


class _CudaLiteralsOnCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in tensor factories to the CPU and answers ``Tensor.type()`` of a CPU
    float tensor as the CUDA type megatron's optimizer asserts on. Nothing else is touched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _FACTORIES and _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.to or func is torch.Tensor.cuda:
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        return func(*args, **kwargs)


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def cuda_literals_on_cpu() -> contextlib.AbstractContextManager:
    """Scope for megatron calls that hard-code CUDA devices; a no-op when CUDA is available."""
    return contextlib.nullcontext() if cuda_available() else _CudaLiteralsOnCpu()
