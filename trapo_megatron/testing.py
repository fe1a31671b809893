"""Spawned multi-process workers for distributed tests and benchmarks (gloo on CPU).

Each worker gets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in its environment, one intra-op thread, and
runs ``fn(rank, world_size, *args)``. The first worker to fail has its traceback re-raised in the parent;
a hang is cut by ``timeout`` and reported with every worker's state, so a mistake never blocks the suite.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, threads: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: torch's queue would hand tensors over in shared memory that dies with the worker.
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):  # teardown after a failure must not mask it
                dist.destroy_process_group()


class WorkerError(AssertionError):
    """A spawned worker raised; the message carries its traceback."""


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240.0, threads: int = 1,
                    start_method: str = "spawn") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results by rank.

    ``fn`` must be importable (module level) and its result picklable. ``start_method="fork"`` lets workers
    inherit modules the parent imported (vllm takes ~20 s to import); only for a parent that has not
    initialized torch.distributed or CUDA.
    """
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        # Not daemonic: workers may start process pools of their own (the reward pool); leftovers are killed below.
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    try:
        while len(outs) < world_size:
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue.Empty:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise WorkerError(
                    f"distributed run timed out after {timeout:.0f}s; ranks still running: {alive}; "
                    f"ranks done: {sorted(outs)}"
                ) from None
            if status == "error":
                raise WorkerError(f"rank {rank} of {world_size} failed:\n{payload}")
            outs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [outs[r] for r in range(world_size)]
