"""The rollout hand-over: each rank receives exactly its data-parallel share of the step, as flat tensors, and
the step's totals from an all-reduce. Oracles: the share built directly from the whole step's rollouts, the
loss masks of algo/masks.py, sums over every sample computed here."""

from __future__ import annotations

import random

import pytest
import torch

from trapo_megatron.algo.aggregation import BatchCounts
from trapo_megatron.algo.loss import LossConfig
from trapo_megatron.algo.masks import loss_masks, token_roles
from trapo_megatron.rollout.handover import Samples, num_loss_tokens
from trapo_megatron.rollout.waves import Rollout
from trapo_megatron.testing import run_distributed
from trapo_megatron.train import batch as batching

FIELDS = tuple(Samples.__dataclass_fields__)


def synthetic_step(num_prompts: int, seed: int = 0) -> list[list[Rollout]]:
    """Groups of 1-4 samples with empty and non-empty prompts, prefixes, continuations and log-probs."""
    rng = random.Random(seed)
    groups = []
    for p in range(num_prompts):
        prompt = [rng.randrange(1000) for _ in range(rng.choice([0, 1, 5]))]
        group = []
        for i in range(rng.randint(1, 4)):
            prefix = [rng.randrange(1000) for _ in range(rng.choice([0, 0, 3]))]
            cont = [rng.randrange(1000) for _ in range(rng.choice([0, 2, 7]))]
            lps = [-rng.random() for _ in cont] if rng.random() < 0.8 else []
            group.append(Rollout(example_index=p, sample_index=i, micro_group=i, guided=bool(prefix),
                                 ratio=0.5 if prefix else 0.0, prompt_ids=prompt, prefix_ids=prefix,
                                 continuation_ids=cont, continuation_logprobs=lps,
                                 sft_on_prefix=bool(prefix) and rng.random() < 0.5,
                                 reward=rng.choice([0.0, 1.0, 0.25])))
        groups.append(group)
    return groups


def assert_same(a: Samples, b: Samples) -> None:
    for k in FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and torch.equal(x, y), k


def test_loss_token_counts_match_the_masks() -> None:
    groups = synthetic_step(40)
    s = Samples.from_rollouts(groups, range(40))
    flat = [r for g in groups for r in g]
    for r, n in zip(flat, num_loss_tokens(s).tolist(), strict=True):
        length = len(r.prompt_ids) + len(r.prefix_ids) + len(r.continuation_ids)
        roles = token_roles(torch.tensor([len(r.prompt_ids)]), torch.tensor([len(r.prefix_ids)]),
                            torch.tensor([len(r.continuation_ids)]), length)
        sft, rl = loss_masks(roles, torch.tensor([r.sft_on_prefix]))
        assert n == int((sft | rl).sum())


def test_wire_round_trip_and_reorder() -> None:
    groups = synthetic_step(9)
    s = Samples.from_rollouts(groups, range(9))
    assert_same(Samples.from_wire(s.to_wire()), s)
    odd, even = s.take(torch.tensor([1, 3, 5, 7])), s.take(torch.tensor([0, 2, 4, 6, 8]))
    assert_same(Samples.cat([odd, even]), s)
    assert_same(odd, Samples.from_rollouts(groups[1::2], range(1, 9, 2)))


def test_sequences_hold_the_rollouts_tokens_and_logprobs() -> None:
    r = Rollout(example_index=0, sample_index=0, micro_group=1, guided=True, ratio=0.2, prompt_ids=[1, 5, 9],
                prefix_ids=[31, 32], continuation_ids=[77, 78, 2], continuation_logprobs=[-0.3, -1.2, -0.01],
                sft_on_prefix=True, reward=1.0)
    other = Rollout(example_index=0, sample_index=1, micro_group=0, guided=False, ratio=0.0, prompt_ids=[1, 5, 9],
                    prefix_ids=[], continuation_ids=[4], continuation_logprobs=[-0.5], reward=0.0)
    s = Samples.from_rollouts([[r, other]], [0])
    counts = BatchCounts.from_tensor(torch.tensor([2.0, 6.0, 2.0]))
    seq = batching.sequences(s, LossConfig(advantage="drgrpo", aggregation="token_mean"), 8, counts)[0]
    assert seq.tokens.tolist() == [1, 5, 9, 31, 32, 77, 78, 2]
    assert seq.rollout_logprobs.tolist() == pytest.approx([0, 0, 0, 0, -0.3, -1.2, -0.01, 0])
    assert seq.sft_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0] and seq.rl_mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert seq.advantages[0].item() == 0.5  # 1 - mean(1, 0)
    assert seq.token_weight.tolist() == pytest.approx([0, 0, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 0])


# (engine TP, each world rank's data-parallel rank): DP 4; DP 2 under TP 2 (ranks 0,1 share DP rank 0), engine
# TP 2; DP 2 with the DP rank varying fastest; one replica (engine TP 4) feeding DP 2
LAYOUTS = [(1, (0, 1, 2, 3)), (2, (0, 0, 1, 1)), (2, (0, 1, 0, 1)), (4, (0, 1, 0, 1))]
NUM_PROMPTS = 12


def handover_worker(rank: int, world: int) -> list[dict]:
    import torch.distributed as dist

    from trapo_megatron.rollout import handover
    from trapo_megatron.rollout.replicas import ReplicaLayout
    from trapo_megatron.rollout.waves import WaveStats

    dist.init_process_group("gloo")
    received = [0]
    batch_isend_irecv = dist.batch_isend_irecv

    def counting(ops):
        received[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.irecv)
        return batch_isend_irecv(ops)

    dist.batch_isend_irecv = counting
    groups = synthetic_step(NUM_PROMPTS)
    out = []
    for etp, dp_ranks in LAYOUTS:
        layout = ReplicaLayout(world_size=world, tensor_parallel_size=etp, rank=rank)
        positions = layout.positions(NUM_PROMPTS)
        mine = Samples.from_rollouts([groups[p] for p in positions], positions) if layout.is_leader else None
        guided = torch.tensor([r.guided for p in positions for r in groups[p]]) if layout.is_leader else None
        stats = WaveStats(num_engine_calls=2, num_generated=len(positions), guided_prompts=[0, len(positions)],
                          generate_seconds=float(layout.index + 1))
        received[0] = 0
        totals, waves = handover.reduce_step(mine, guided, stats, dist.group.WORLD)
        share = handover.exchange(mine, NUM_PROMPTS, layout, dp_ranks, max(dp_ranks) + 1, dist.group.WORLD)
        out.append({"share": share, "totals": totals, "waves": waves, "received": received[0]})
    return out


def test_each_rank_receives_only_its_share() -> None:
    per_rank = run_distributed(handover_worker, 4, timeout=120)
    groups = synthetic_step(NUM_PROMPTS)
    flat = [r for g in groups for r in g]
    whole_wire = Samples.from_rollouts(groups, range(NUM_PROMPTS)).to_wire().numel() * 4
    masks = [loss_masks(token_roles(torch.tensor([len(r.prompt_ids)]), torch.tensor([len(r.prefix_ids)]),
                                    torch.tensor([len(r.continuation_ids)]),
                                    len(r.prompt_ids) + len(r.prefix_ids) + len(r.continuation_ids)),
                        torch.tensor([r.sft_on_prefix])) for r in flat]
    loss_tokens = [int((sft | rl).sum()) for sft, rl in masks]
    unguided = [r for r in flat if not r.guided]
    for i, (etp, dp_ranks) in enumerate(LAYOUTS):
        dp = max(dp_ranks) + 1
        for rank, results in enumerate(per_rank):
            got = results[i]
            d = dp_ranks[rank]
            expected = Samples.from_rollouts(groups[d::dp], range(d, NUM_PROMPTS, dp))
            assert_same(got["share"], expected)
            # over the wire: from each other replica's leader, the share's groups it holds (and their size)
            replicas = 4 // etp
            remote = [[p for p in range(r, NUM_PROMPTS, replicas) if p % dp == d]
                      for r in range(replicas) if r * etp != rank]
            assert got["received"] == sum(
                8 + 4 * Samples.from_rollouts([groups[p] for p in ps], ps).to_wire().numel() for ps in remote if ps)
            assert got["received"] <= 4 * expected.to_wire().numel() + 24 * replicas < whole_wire  # headers: 24 B
            t = got["totals"]
            assert t.counts.as_tensor().tolist() == [len(flat), sum(loss_tokens), sum(n > 0 for n in loss_tokens)]
            assert (t.num_samples, t.num_prompts) == (len(flat), NUM_PROMPTS)
            assert t.num_tokens == sum(len(r.prompt_ids) + len(r.response_ids) for r in flat)
            assert t.num_unguided == len(unguided)
            assert t.reward_sum_unguided == sum(r.reward for r in unguided)
            assert t.response_len_sum_unguided == sum(len(r.response_ids) for r in unguided)
            w = got["waves"]
            assert (w.num_engine_calls, w.num_generated) == (2 * replicas, NUM_PROMPTS)
            assert w.guided_prompts == [0, NUM_PROMPTS] and w.generate_seconds == replicas
