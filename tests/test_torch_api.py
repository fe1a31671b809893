"""The torch.distributed API our code calls exists in older torch releases too (a cluster image may carry
another torch than the lock's 2.14): every ``dist.X`` / ``torch.distributed.X`` name used in the package,
tools and benchmarks is in this list of names torch 2.4 already had. ``all_gather_single`` is not: it
arrived with 2.14, and the weight stream crashed at TP > 1 on an older image."""

import pathlib
import re

import trapo_megatron

SINCE_TORCH_2_4 = {
    "ProcessGroup", "ReduceOp", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "barrier", "broadcast", "broadcast_object_list", "checkpoint", "destroy_process_group", "get_backend",
    "get_global_rank", "get_process_group_ranks", "get_rank", "get_world_size", "group", "init_process_group", "is_available",
    "is_initialized", "new_group", "recv", "send", "reduce_scatter_tensor",
    "P2POp", "isend", "irecv", "batch_isend_irecv",  # the hand-over's point-to-point (rollout/handover.py)
    "elastic", "run",  # modules: torchrun (torch.distributed.run) and its elastic agent
}
ROOT = pathlib.Path(trapo_megatron.__file__).parent


def test_only_long_standing_distributed_calls():
    used = {}
    for path in [*ROOT.rglob("*.py"), *ROOT.parent.glob("tools/*.py"), *ROOT.parent.glob("benchmarks/*.py")]:
        for name in re.findall(r"\b(?:dist|torch\.distributed)\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text()):
            used.setdefault(name, path.name)
    assert "all_gather_into_tensor" in used
    assert {n: f for n, f in used.items() if n not in SINCE_TORCH_2_4} == {}
