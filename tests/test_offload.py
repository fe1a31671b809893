"""Offload during rollout: at DP=2 with the distributed optimizer, parameters, main grads and optimizer state
are bit-identical after offload + restore, and the offloaded storages really are empty in between. (A 3-step
run with offload on equals one with it off: tests/test_rollout_topology.py.)"""

from __future__ import annotations

import pytest
import torch

from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(600)


def _state(policy) -> dict[str, torch.Tensor]:
    from trapo_megatron.megatron.offload import grad_buffers, optimizer_tensors

    out = {f"param{i}": p.detach().clone() for i, p in enumerate(p for c in policy.chunks for p in c.parameters())}
    out.update({f"main_grad{i}": p.main_grad.clone() for i, p in
                enumerate(p for c in policy.chunks for p in c.parameters())})
    out.update({f"grad_buffer{i}": t.clone() for i, t in enumerate(grad_buffers(policy.chunks))})
    out.update({f"optimizer{i}": t.detach().clone() for i, t in enumerate(optimizer_tensors(policy.optimizer))})
    return out


def offload_worker(rank: int, world: int, model_dir: str) -> dict:
    from transformers import AutoConfig

    from trapo_megatron.algo.loss import LossConfig
    from trapo_megatron.megatron import platform
    from trapo_megatron.megatron.model_builder import ModelConfig
    from trapo_megatron.megatron.offload import TrainingStateOffload, grad_buffers, optimizer_tensors
    from trapo_megatron.megatron.policy import MegatronPolicy
    from trapo_megatron.megatron.step import OptimizerConfig
    from trapo_megatron.rollout.handover import Samples, batch_counts
    from trapo_megatron.rollout.waves import Rollout
    from trapo_megatron.train import batch as batching

    platform.initialize(platform.ParallelConfig(), seed=3)
    policy = MegatronPolicy(AutoConfig.from_pretrained(model_dir), model_dir, ModelConfig(hf_path=model_dir),
                            platform.ParallelConfig(), OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), 4)
    rollouts = [Rollout(example_index=0, sample_index=i, micro_group=0, guided=False, ratio=0.0,
                        prompt_ids=[3, 4 + rank, 5], prefix_ids=[], continuation_ids=[6 + i, 7, 8],
                        continuation_logprobs=[-1.0, -1.0, -1.0], reward=float(i % 2)) for i in range(4)]
    samples = Samples.from_rollouts([rollouts], [0])
    seqs = batching.sequences(samples, LossConfig(), 8, batch_counts(samples))
    policy.train_step(batching.micro_batches(seqs, 64), LossConfig())  # Adam state exists, grads are non-zero
    before = _state(policy)
    offload = TrainingStateOffload("grads+optimizer", policy.chunks, policy.optimizer)
    moved = offload.offload()
    empty_grads = all(t.untyped_storage().nbytes() == 0 for t in grad_buffers(policy.chunks))
    opt = optimizer_tensors(policy.optimizer)
    weights = {p.untyped_storage().data_ptr() for c in policy.chunks for p in c.parameters()}
    states = [t for t in opt if t.untyped_storage().data_ptr() not in weights]
    empty_optimizer = bool(states) and all(t.untyped_storage().nbytes() == 0 for t in states)
    weights_kept = all(p.untyped_storage().nbytes() > 0 for c in policy.chunks for p in c.parameters())
    offload.restore()
    after = _state(policy)
    platform.destroy()
    return {"moved": moved, "empty_grads": empty_grads, "empty_optimizer": empty_optimizer,
            "weights_kept": weights_kept, "same": before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before),
            "nonzero_grads": any(before[k].abs().sum() > 0 for k in before if k.startswith("grad_buffer"))}


def test_offload_round_trip_is_bit_identical_at_dp2() -> None:
    from trapo_megatron.commands.demo import ASSETS

    for out in run_distributed(offload_worker, 2, str(ASSETS / "model"), timeout=500):
        assert out["moved"] > 0 and out["nonzero_grads"]
        assert out["empty_grads"] and out["empty_optimizer"] and out["weights_kept"]
        assert out["same"]
