"""Strict collectives: a host tensor reaching a device group's collective raises and names the call site;
device tensors, the host group and megatron's own collectives pass. On a GPU NCCL rejects host tensors
("No backend type associated with device type cpu"); this makes the same mistake fail on the CPU."""

from __future__ import annotations

import pytest
import torch

from trapo_megatron.megatron import platform
from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(300)


def test_suite_runs_strict() -> None:
    assert platform.strict_collectives()  # tests/conftest.py turns it on for every test and spawned worker


def test_tracker_places_tensors_as_a_gpu_would() -> None:
    with platform._HostTensorTracker():
        host = torch.tensor(3.0)
        dev = torch.zeros(3, device=platform.device())
        assert platform.is_host_tensor(host) and not platform.is_host_tensor(dev)
        assert platform.is_host_tensor(host.clone().float() * 2)  # derived from host data only
        assert not platform.is_host_tensor(dev * host)  # a 0-dim host scalar in device math
        assert platform.is_host_tensor(torch.stack([host, host])) and not platform.is_host_tensor(torch.stack([dev]))
        assert not platform.is_host_tensor(platform.to_device(host)) and not platform.is_host_tensor(host.to(dev.device))
        assert platform.is_host_tensor(dev.cpu()) and platform.is_host_tensor(torch.zeros_like(host))
        assert not platform.is_host_tensor(torch.zeros_like(dev)) and not platform.is_host_tensor(host.new_zeros(2, device=dev.device))
        host.add_(dev.sum())  # in place: stays where it is
        assert platform.is_host_tensor(host)


def _host_on_dp(dp) -> None:
    import torch.distributed as dist

    counts = torch.tensor([1.0, 2.0]).clone().float()
    dist.all_reduce(counts, group=dp)  # the mistake strict mode exists for


def _strict_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    platform.initialize(platform.ParallelConfig(), seed=1)
    errors = {}
    for name, call in (("dp", lambda: _host_on_dp(ps.get_data_parallel_group())),
                       ("world", lambda: dist.broadcast(torch.zeros(2), src=0))):
        try:
            call()
        except RuntimeError as e:  # raised before any rank enters the collective: the world stays usable
            errors[name] = str(e)
    dev = platform.to_device(torch.tensor([1.0, 2.0]))
    dist.all_reduce(dev, group=ps.get_data_parallel_group())
    host = torch.tensor([3.0])
    dist.all_reduce(host, group=platform.host_group())
    gloo = torch.tensor([1.0])  # megatron's own gloo groups serve host tensors on a GPU too
    dist.all_reduce(gloo, group=ps.get_data_parallel_group_gloo())
    platform.destroy()
    return {"errors": errors, "sum": float(dev.sum() + host.sum() + gloo.sum())}


def test_host_tensors_on_device_groups_raise_naming_the_call_site() -> None:
    for out in run_distributed(_strict_worker, 2, timeout=240):
        dp, world = out["errors"]["dp"], out["errors"]["world"]
        assert "strict collectives: dist.all_reduce got a host tensor (2,) torch.float32 on a device group" in dp
        assert "test_strict_collectives.py" in dp and "in _host_on_dp" in dp
        assert "dist.broadcast got a host tensor (2,)" in world and "the default (WORLD) group" in world
        assert out["sum"] == 6.0 + 6.0 + 2.0  # device tensors and host groups pass


def _bound_worker(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, mappings

    platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=2), seed=1)
    wrapped = {name: hasattr(getattr(module, name), "trapo_strict") for module in (mappings, param_and_grad_buffer)
               for name in ("dist_all_gather_func", "dist_reduce_scatter_func")}
    tp = ps.get_tensor_model_parallel_group()
    try:  # megatron's own SP gather, which calls the all_gather_into_tensor it bound at import
        gather_from_sequence_parallel_region(torch.ones(2, 3), group=tp)
        error = ""
    except RuntimeError as e:
        error = str(e)
    gathered = gather_from_sequence_parallel_region(platform.to_device(torch.ones(2, 3)), group=tp)
    platform.destroy()
    restored = not hasattr(mappings.dist_all_gather_func, "trapo_strict")
    return {"wrapped": wrapped, "error": error, "shape": tuple(gathered.shape), "restored": restored}


def test_the_collectives_megatron_bound_at_import_are_checked_too() -> None:
    """mappings.py / param_and_grad_buffer.py hold all_gather_into_tensor / reduce_scatter_tensor under their
    own names (the SP gathers, DDP's reduce-scatter, the distributed optimizer's all-gather)."""
    for out in run_distributed(_bound_worker, 2, timeout=240):
        assert all(out["wrapped"].values()), out["wrapped"]
        assert "dist.all_gather_into_tensor got a host tensor" in out["error"] and "device group" in out["error"]
        assert "megatron/core/tensor_parallel/mappings.py" in out["error"]  # the call site megatron bound
        assert out["shape"] == (4, 3) and out["restored"]
