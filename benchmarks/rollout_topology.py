"""Rollout-topology benchmark (CPU, world 4 by default): wall time of one step's rollouts when every engine
replica generates its own slice (engine TP 1: one replica per rank) against the leader-only path (engine TP =
world: one replica, whose leader generates the whole batch while the other ranks wait for its outputs, as the
CPU twin did before rollout/service.py). Same prompts, same seeds, same model (the demo's), the full service path: waves,
replica-wide grading with math-verify, the hand-over. Ratio = leader-only / all replicas (> 1: faster).

    python benchmarks/rollout_topology.py [--world 4] [--prompts 16] [--repeats 2] [--threads 1]
With more ranks than cores the replicas compete for cores: the ratio is bounded by min(world, cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from trapo_megatron.testing import run_distributed


def rollout_worker(rank: int, world: int, engine_tp: int, num_prompts: int, repeats: int) -> float:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from transformers import AutoTokenizer

    from trapo_megatron.commands.demo import CONFIG, _asset_overrides
    from trapo_megatron.data.dataset import load_examples
    from trapo_megatron.reward.math_reward import MathRewardPool
    from trapo_megatron.rollout.cpu_engine import CpuEngine, ReplicaCpuEngine
    from trapo_megatron.rollout.replicas import ReplicaLayout, new_replica_group
    from trapo_megatron.rollout.service import ReplicaScorer, RolloutService
    from trapo_megatron.train.config import load_config

    cfg = load_config(str(CONFIG), _asset_overrides("runs/bench") + ["reward.num_workers=1"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    examples, _ = load_examples(cfg.data, cfg.prompt, tokenizer)
    layout = ReplicaLayout(world_size=world, tensor_parallel_size=engine_tp, rank=rank)
    group = new_replica_group(layout)
    inner = CpuEngine.from_pretrained(cfg.model.hf_path) if layout.is_leader else None
    engine = ReplicaCpuEngine(inner, layout, group) if engine_tp > 1 else inner
    own_weights = dict(inner.model.state_dict()) if inner is not None else {}
    scorer = ReplicaScorer(MathRewardPool(cfg.reward) if layout.is_leader else None, layout, group)
    service = RolloutService(engine, scorer, layout, dist.group.WORLD, tokenizer=tokenizer, rollout=cfg.rollout,
                             schedule=cfg.micro_groups, dp_rank=rank, dp_size=world)
    best = best_rollout_seconds(service, examples[:num_prompts], own_weights, repeats)
    service.close()
    dist.destroy_process_group()
    return best


def best_rollout_seconds(service, batch: list, weights: dict, repeats: int) -> float:
    """Best wall time of ``repeats`` steps' rollouts of ``batch`` over the world, each after the refit that
    wakes the engine (untimed); one warm-up step first (reward pool start, first forward)."""
    import torch.distributed as dist

    service.roll_out(batch, step=1)
    best = float("inf")
    for r in range(repeats):
        service.load_weights(weights.items())
        dist.barrier()
        t0 = time.perf_counter()
        service.roll_out(batch, step=2 + r)
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4, help="ranks (the demo's 2; the issue's 4)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the step (the demo's 16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per topology (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seconds = {}
    for name, engine_tp in (("all_replicas", 1), ("leader_only", args.world)):
        seconds[name] = max(run_distributed(rollout_worker, args.world, engine_tp, args.prompts, args.repeats,
                                            timeout=1800, threads=args.threads))
    print(json.dumps({"world": args.world, "prompts": args.prompts, "cores": os.cpu_count(), **seconds,
                      "ratio_leader_only_over_all_replicas": seconds["leader_only"] / seconds["all_replicas"]},
                     indent=2))


if __name__ == "__main__":
    main()
