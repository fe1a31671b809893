"""A launch smoke test: every rank all-reduces a one, and rank 0 checks the sum equals the world size.

Run it through `trapo launch <recipe> --task smoke` before a long job: it proves the nodes, the GPUs, the
rendezvous and the interconnect work, in seconds. ``--fail-rank R`` makes rank R exit with code 3 (the tests
use it to check that a failed rank fails the launch).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trapo_megatron.launch.smoke")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank exits with code 3")
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.fail_rank == rank:
        print(f"rank {rank}: failing on purpose (--fail-rank)", flush=True)
        return 3
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    one = torch.ones(1, device="cuda" if cuda else "cpu")
    dist.all_reduce(one)
    ok = int(one.item()) == world
    print(f"rank {rank}/{world} on {os.uname().nodename}: all-reduce {int(one.item())} "
          f"({'ok' if ok else 'WRONG'})", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 4


if __name__ == "__main__":
    sys.exit(main())
