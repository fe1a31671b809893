"""Rollout hand-over benchmark (CPU, gloo): one step's rollouts from the engine replicas' leaders to the training
sequences of every rank, the gathered path (every replica's rollouts as Python objects to every rank with
all_gather_object, every rank building the tensors of every sample, then taking its data-parallel share: the
hand-over before rollout/handover.py) against the share path (each rank receives only its share as flat
tensors, the step's totals from one all-reduce). Same synthetic step for both, a 32B-shaped one by default:
512 prompts x 8 samples, prompts of 64-1024 tokens, responses lognormal around 2.5k tokens cut at 8192 (about
a sixth hit the budget), a quarter of the samples guided by an expert prefix.

Per rank: bytes received into its buffers by the collectives (all_gather_object pads every payload to the
largest), peak extra anonymous RSS over the hand-over (after the synthetic rollouts exist), and seconds.
Printed as the worst rank's figures and ratios gathered / share (> 1: the share path is cheaper).

    python benchmarks/handover.py [--worlds 4 8] [--prompts 512] [--samples 8] [--engine-tp 2] [--train-tp 2]
The gathered path at 512 x 8 needs ~2 GB per rank: scale --prompts down where world x that does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the workers: freed buffers leave the RSS

from benchmarks.weight_stream import PeakRSS
from trapo_megatron.testing import run_distributed

MAX_RESPONSE = 8192
QWEN25_32B = {"model_type": "qwen2", "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 27648,
              "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False}


def synthetic_groups(positions: range, samples: int, seed: int) -> list:
    """Graded groups for ``positions``, a function of (seed, position) only."""
    import torch

    from trapo_megatron.rollout.waves import Rollout

    groups = []
    for p in positions:
        g = torch.Generator().manual_seed(seed * 1_000_003 + p)
        prompt = torch.randint(200, 151_000, (int(torch.randint(64, 1025, (1,), generator=g)),), generator=g).tolist()
        group = []
        for i in range(samples):
            length = min(MAX_RESPONSE, max(1, int(torch.empty(1).log_normal_(7.8, 0.7, generator=g))))
            guided = i >= samples * 3 // 4
            cut = length // 3 if guided else 0
            response = torch.randint(200, 151_000, (length,), generator=g).tolist()
            cont = response[cut:]
            group.append(Rollout(example_index=p, sample_index=i, micro_group=i // 2, guided=guided,
                                 ratio=0.3 if guided else 0.0, prompt_ids=prompt, prefix_ids=response[:cut],
                                 continuation_ids=cont, continuation_logprobs=(-torch.rand(len(cont), generator=g)).tolist(),
                                 sft_on_prefix=guided and i % 2 == 0, reward=float(i % 3 == 0), finish_reason="stop"))
        groups.append(group)
    return groups


def gathered(groups: list, positions: range, stats, layout, dp_rank: int, dp_size: int, num_items: int, loss) -> list:
    """The hand-over as it was: leaders' (positions, groups, stats) to every rank, every sample's tensors."""
    import torch
    import torch.distributed as dist

    from trapo_megatron.algo.advantages import ADVANTAGES
    from trapo_megatron.algo.aggregation import BatchCounts, token_weights
    from trapo_megatron.algo.masks import loss_masks, shift_labels, token_roles
    from trapo_megatron.train.batch import Sequence

    every: list = [None] * layout.world_size
    dist.all_gather_object(every, (list(positions), groups, stats) if layout.is_leader else None)
    parts = [every[r] for r in range(0, layout.world_size, layout.tensor_parallel_size)]
    by_position = {p: g for pos, gs, _ in parts for p, g in zip(pos, gs, strict=True)}
    step = [by_position[p] for p in range(num_items)]
    rewards = torch.tensor([r.reward for g in step for r in g])
    advantages = iter(ADVANTAGES["drgrpo"](rewards, torch.tensor([i for i, g in enumerate(step) for _ in g])).tolist())
    seq_groups = []
    for g in step:
        seqs = []
        for r in g:
            tokens = torch.tensor(r.prompt_ids + r.prefix_ids + r.continuation_ids, dtype=torch.long)
            roles = token_roles(torch.tensor([len(r.prompt_ids)]), torch.tensor([len(r.prefix_ids)]),
                                torch.tensor([len(r.continuation_ids)]), len(tokens))
            sft, rl = (m[0] for m in loss_masks(roles, torch.tensor([r.sft_on_prefix])))
            lp = torch.zeros(len(tokens))
            start = len(r.prompt_ids) + len(r.prefix_ids) - 1
            lp[start:start + len(r.continuation_logprobs)] = torch.tensor(r.continuation_logprobs)
            response = torch.zeros(len(tokens), dtype=torch.bool)
            response[max(len(r.prompt_ids) - 1, 0):len(tokens) - 1] = True
            seqs.append(Sequence(tokens=tokens, labels=shift_labels(tokens), sft_mask=sft, rl_mask=rl,
                                 advantages=torch.full((len(tokens),), next(advantages)), rollout_logprobs=lp,
                                 response_mask=response))
        seq_groups.append(seqs)
    flat = [s for g in seq_groups for s in g]
    total = torch.zeros(3)
    for s in flat:
        total += BatchCounts.of((s.sft_mask | s.rl_mask).unsqueeze(0)).as_tensor()
    counts = BatchCounts.from_tensor(total)
    for s in flat:
        s.token_weight = token_weights((s.sft_mask | s.rl_mask).unsqueeze(0), loss.aggregation,
                                       max_response_len=MAX_RESPONSE, counts=counts)[0]
    return [s for g in seq_groups[dp_rank::dp_size] for s in g]


def share(groups: list, positions: range, stats, layout, dp_ranks: list, dp_size: int, num_items: int, loss) -> list:
    """The hand-over as the rollout service does it now."""
    import torch
    import torch.distributed as dist

    from trapo_megatron.rollout.handover import Samples, exchange, reduce_step
    from trapo_megatron.train.batch import sequences

    mine = Samples.from_rollouts(groups, positions) if layout.is_leader else None
    guided = torch.tensor([r.guided for g in groups for r in g]) if layout.is_leader else None
    totals, _ = reduce_step(mine, guided, stats, dist.group.WORLD)
    samples = exchange(mine, num_items, layout, dp_ranks, dp_size, dist.group.WORLD)
    return sequences(samples, loss, MAX_RESPONSE, totals.counts)


def handover_worker(rank: int, world: int, path: str, num_prompts: int, samples: int, engine_tp: int,
                    train_tp: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from trapo_megatron.algo.loss import LossConfig
    from trapo_megatron.rollout.replicas import ReplicaLayout
    from trapo_megatron.rollout.waves import WaveStats

    dist.init_process_group("gloo")
    layout = ReplicaLayout(world_size=world, tensor_parallel_size=engine_tp, rank=rank)
    dp_size, dp_rank = world // train_tp, rank // train_tp  # TP blocks of contiguous ranks, as megatron's order
    positions = layout.positions(num_prompts)
    # every rank of a replica ran the waves (SPMD); only the leader's copy is handed over
    groups = synthetic_groups(positions, samples, seed=0) if layout.is_leader else []
    stats = WaveStats(num_engine_calls=4, num_generated=len(positions) * samples, guided_prompts=[0, 1, 2, 3])
    received = [0]

    def count(fn, nbytes):
        def wrapper(*args, **kwargs):
            received[0] += nbytes(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapper

    def gathered_bytes(out, *_a, **_k):  # the slots filled by the other ranks
        return sum(t.numel() * t.element_size() for t in out) * (world - 1) // world

    c10d.all_gather = count(c10d.all_gather, gathered_bytes)  # what all_gather_object calls
    dist.all_reduce = count(dist.all_reduce, lambda t, *a, **k: t.numel() * t.element_size())
    dist.batch_isend_irecv = count(dist.batch_isend_irecv, lambda ops: sum(
        op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.irecv))
    loss = LossConfig(advantage="drgrpo")
    dist.barrier()
    with PeakRSS() as rss:
        start = time.perf_counter()
        if path == "gathered":
            seqs = gathered(groups, positions, stats, layout, dp_rank, dp_size, num_prompts, loss)
        else:
            seqs = share(groups, positions, stats, layout, [r // train_tp for r in range(world)], dp_size,
                         num_prompts, loss)
        seconds = time.perf_counter() - start
    digest = torch.cat([torch.cat([s.tokens.float(), s.token_weight, s.rollout_logprobs, s.advantages])
                        for s in seqs]).double().sum().item()
    dist.barrier()
    return {"bytes": received[0], "rss": rss.extra, "seconds": seconds, "sequences": len(seqs), "digest": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--engine-tp", type=int, default=2)
    parser.add_argument("--train-tp", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        result = {}
        for path in ("gathered", "share"):
            ranks = run_distributed(handover_worker, world, path, args.prompts, args.samples, args.engine_tp,
                                    args.train_tp, timeout=3600)
            if path == "share":
                assert [r["digest"] for r in ranks] == [r["digest"] for r in result["gathered"]], "paths differ"
            result[path] = ranks
        worst = {p: {k: max(r[k] for r in ranks) for k in ("bytes", "rss", "seconds")} for p, ranks in result.items()}
        rows.append({"world": world, "prompts": args.prompts, "samples": args.samples, "engine_tp": args.engine_tp,
                     "train_tp": args.train_tp, "worst_rank": worst,
                     "ratio_gathered_over_share": {k: worst["gathered"][k] / worst["share"][k]
                                                   for k in ("bytes", "rss", "seconds")}})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"weight_stream_32b_tp4_pp4_bf16_gb": weight_stream_bytes(4, 4)}))


def weight_stream_bytes(tp: int, pp: int) -> dict:
    """The weight stream's bytes per rank of the worst stage (analytic, convert/stream.bytes_per_rank): TP shards
    across stages now, full tensors before (what TP=1 moves across)."""
    from trapo_megatron import model_spec
    from trapo_megatron.convert.stream import bytes_per_rank

    dims = model_spec.from_hf_config(QWEN25_32B)
    now = [bytes_per_rank(dims, tp, pp, stage, 2) for stage in range(pp)]
    before = max(bytes_per_rank(dims, 1, pp, stage, 2)["across_stages"] for stage in range(pp))
    across, within = (max(n[k] for n in now) for k in ("across_stages", "within_stage"))
    return {"across_stages": across / 1e9, "within_stage": within / 1e9, "across_before": before / 1e9,
            "ratio_across_before_over_now": before / across}


if __name__ == "__main__":
    main()
