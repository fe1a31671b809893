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
