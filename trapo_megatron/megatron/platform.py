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

Strict collectives (``TRAPO_STRICT_COLLECTIVES=1``, on for the whole test suite): NCCL serves only tensors on
the device, so a host tensor reaching a Megatron group crashes the first GPU step. On the CPU both kinds of
tensor live in the same memory, so strict mode tells them apart by where they were born (see
:class:`_HostTensorTracker`) and checks every torch.distributed collective (:func:`_check_collective`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

STRICT_ENV = "TRAPO_STRICT_COLLECTIVES"
"""Environment switch of strict collectives ("1": on); inherited by spawned and torchrun'd workers."""


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


def strict_collectives() -> bool:
    """Whether a host tensor reaching a device group's collective raises (see the module docstring)."""
    return os.environ.get(STRICT_ENV, "0") == "1"


def to_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on :func:`device` (a copy when it lives elsewhere): what a collective on a Megatron group needs."""
    return t.to(device())


_host_group: Any = None
"""A gloo group over the whole world when the default backend is NCCL or strict collectives are on (None: the
default group is gloo and serves host tensors)."""


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
            if os.environ.get("TRAPO_CUDA_SYNC_DEBUG"):  # "warn" | "error": every device->host sync reported
                torch.cuda.set_sync_debug_mode(os.environ["TRAPO_CUDA_SYNC_DEBUG"])
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    global _host_group
    if _host_group is None and (dist.get_backend() != "gloo" or strict_collectives()):
        # Under strict mode the CPU run mirrors the GPU one: WORLD is a device group, host tensors go here.
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    parallel.data_parallel_size(dist.get_world_size())  # validates the layout, names the knobs
    if not cuda_available():
        _install_cpu_compat()
        if strict_collectives():
            _install_strict_collectives()
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
    _remove_strict_collectives()
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


# --------------------------------------------------------------------------------------------------
# Strict collectives (CPU only: on a GPU, NCCL itself rejects host tensors)
# --------------------------------------------------------------------------------------------------

_HOST = "_trapo_host_tensor"
"""Attribute set on tensors that would live in host memory on a GPU machine."""

_HOST_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.from_numpy,
    torch.scalar_tensor,
}
_LIKE_FACTORIES = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                   torch.randn_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty,
                   torch.Tensor.new_full, torch.Tensor.new_tensor}


def is_host_tensor(t: torch.Tensor) -> bool:
    """Strict mode: whether ``t`` would be a host (CPU) tensor on a GPU machine."""
    return getattr(t, _HOST, False)


def _is_host(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and getattr(a, _HOST, False)


def _tensors(args: Any) -> list[torch.Tensor]:
    return [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]


class _HostTensorTracker(TorchFunctionMode):
    """Marks the tensors that would be on the host on a GPU machine, as torch would place them there:

    - a factory without ``device=`` (``torch.tensor(3.0)``, ``torch.zeros(n)``) and ``Tensor.cpu()`` give host
      tensors; an explicit ``device=`` (``platform.device()``, a parameter's ``.device``, megatron's
      ``torch.cuda.current_device()``), ``.to(device)`` and ``.cuda()`` give device tensors (where the CPU's
      ``.to`` returns the tensor itself, a device alias of it is returned instead);
    - ``*_like`` / ``new_*`` without ``device=`` and every other op follow their tensor inputs: the result is
      a host tensor iff all its tensor inputs are (a 0-dim host scalar mixed into device math stays device).
    Parameters, activations, gradients and megatron's buffers are therefore device tensors, as on a GPU.
    Known blind spot: ``device="cpu"`` written explicitly counts as device (on this machine it is one).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            moved = func is torch.Tensor.cuda or kwargs.get("device") is not None or any(
                isinstance(a, (str, torch.device, int, torch.Tensor)) for a in args[1:])
            if moved and out is args[0] and _is_host(out):
                return out.view_as(out)  # on the CPU .to(device) returns the host tensor itself: a device alias
            if _is_host(args[0]) and not moved:
                setattr(out, _HOST, True)
            return out
        if func is torch.Tensor.cpu:
            out = out.view_as(out) if out is args[0] and not _is_host(out) else out  # a host alias of it
            setattr(out, _HOST, True)
            return out
        if not isinstance(out, (torch.Tensor, tuple, list)) or (args and out is args[0]):
            return out  # metadata queries, and in-place ops (the tensor keeps its place)
        if func in _HOST_FACTORIES:
            host = kwargs.get("device") is None
        elif func in _LIKE_FACTORIES:
            host = kwargs.get("device") is None and _is_host(args[0])
        elif func is torch.Tensor.pin_memory:
            host = True
        else:
            inputs = _tensors((args, kwargs))
            host = bool(inputs) and all(getattr(t, _HOST, False) for t in inputs)
        if host:
            for t in _tensors(out):
                setattr(t, _HOST, True)
        return out


_CHECKED_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
    "send", "recv", "batch_isend_irecv",
)  # not isend / irecv themselves: P2POp checks its op against them by identity (the batch is checked)
_BOUND_AT_IMPORT = (
    ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func"),  # SP gathers, TP all-gathers
    ("megatron.core.tensor_parallel.mappings", "dist_reduce_scatter_func"),  # SP reduce-scatters
    ("megatron.core.distributed.param_and_grad_buffer", "dist_all_gather_func"),  # distributed optimizer
    ("megatron.core.distributed.param_and_grad_buffer", "dist_reduce_scatter_func"),  # DDP grad reduction
)
"""megatron-core 0.19.2 names that hold a ``torch.distributed`` collective bound when the module was imported
(``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` at the top of both files): wrapping
``dist.*`` afterwards does not reach them, so they are wrapped where they live. (``_coalescing_manager``,
imported by name in param_and_grad_buffer.py, takes no tensors: the collectives inside it are these.)"""
_saved_collectives: dict[str, Callable] = {}
_saved_bound: dict[tuple[str, str], Callable] = {}
_tracker: _HostTensorTracker | None = None


def host_groups() -> list[Any]:
    """Groups that serve host tensors on a GPU machine: :func:`host_group` and megatron's gloo groups."""
    from megatron.core import parallel_state as ps

    return [host_group(), *(v for k, v in vars(ps).items() if k.endswith("_GLOO") and v is not None)]


def _call_site() -> str:
    """The first frame outside torch and this module: the code that asked for the collective."""
    here = os.path.dirname(torch.__file__)
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(here) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _check_collective(name: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
    bound = signature.bind(*args, **kwargs).arguments
    if name == "batch_isend_irecv":
        pairs = [(op.tensor, op.group) for op in bound["p2p_op_list"]]
    else:
        pairs = [(t, bound.get("group")) for t in _tensors([v for k, v in bound.items() if k != "group"])]
    hosts = host_groups()
    for t, group in pairs:
        if is_host_tensor(t) and not any(group is g for g in hosts):
            where = "the default (WORLD) group" if group is None else f"a device group of ranks " \
                f"{dist.get_process_group_ranks(group)}"
            raise RuntimeError(
                f"strict collectives: dist.{name} got a host tensor {tuple(t.shape)} {t.dtype} on {where}, "
                f"called from {_call_site()}. Device groups (NCCL on GPU) carry only tensors on "
                f"platform.device() (platform.to_device(t)); host-side reductions use platform.host_group().")


def _strict(name: str, fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_collective(name, signature, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.trapo_strict = True  # torch's own collectives carry __wrapped__ too (its logging decorators)
    return wrapper


def _install_strict_collectives() -> None:
    global _tracker
    if _tracker is not None:
        return
    for name in _CHECKED_COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            _saved_collectives[name] = fn
            setattr(dist, name, _strict(name, fn))
    wrappers = {id(fn): getattr(dist, name) for name, fn in _saved_collectives.items()}
    for module_name, attr in _BOUND_AT_IMPORT:
        module = importlib.import_module(module_name)
        bound = getattr(module, attr, None)
        if id(bound) in wrappers:  # left alone if megatron rebound it (e.g. its fp32-accumulating variant)
            _saved_bound[module_name, attr] = bound
            setattr(module, attr, wrappers[id(bound)])
    _tracker = _HostTensorTracker()
    _tracker.__enter__()


def _remove_strict_collectives() -> None:
    global _tracker
    for name, fn in _saved_collectives.items():
        setattr(dist, name, fn)
    _saved_collectives.clear()
    for (module_name, attr), fn in _saved_bound.items():
        setattr(sys.modules[module_name], attr, fn)
    _saved_bound.clear()
    if _tracker is not None:
        _tracker.__exit__(None, None, None)
        _tracker = None
