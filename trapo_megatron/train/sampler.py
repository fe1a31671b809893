"""The data order: which prompts make up step ``step``. A seeded permutation per epoch, so a step's batch
depends only on (seed, step) and resuming needs no data-loader state.

Orders (``data.order``):
- "seeded": ``random.Random`` shuffles seeded by run.seed and the epoch; every prompt is used, a step may
  span two epochs.
- "randperm": the official sampler (Su-my/TRAPO verl/trapo_src/rl_dataset_with_target.py:427-461, its
  DataLoader in mix_trainer.py:309-318): epoch e is the (e+1)-th ``torch.randperm`` of ONE generator seeded
  data.order_seed (47), cut into steps with drop_last (an epoch's leftover prompts are never used).
"""

from __future__ import annotations

import random

import torch

from trapo_megatron.data.dataset import Example


def _seeded(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _randperm(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.randperm(n, generator=generator)  # the earlier epochs' draws, as one long-lived sampler made them
    return torch.randperm(n, generator=generator).tolist()


ORDERS = {"seeded": (_seeded, False), "randperm": (_randperm, True)}
"""data.order -> (epoch permutation (n, seed, epoch), drop_last)."""


class StepSampler:
    """The whole step's batch, in its (seed, step) order; positions in it are what replicas and DP ranks split."""

    def __init__(self, examples: list[Example], prompts_per_step: int, seed: int, order: str = "seeded") -> None:
        if order not in ORDERS:
            raise ValueError(f"data.order must be one of {sorted(ORDERS)}, got {order!r}")
        self.examples = examples
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._permute, drop_last = ORDERS[order]
        n = len(examples)
        self._per_epoch = (n // prompts_per_step) * prompts_per_step if drop_last else n
        if self._per_epoch == 0:
            raise ValueError(f"data.order={order!r} drops an epoch's last partial step: {n} prompts make no "
                             f"whole step of run.prompts_per_step={prompts_per_step}")
        self._orders: dict[int, list[int]] = {}

    def batch(self, step: int) -> list[Example]:
        """The ``prompts_per_step`` prompts of step ``step`` (1-based), over every rank."""
        per_step = self.prompts_per_step
        out = []
        for pos in range((step - 1) * per_step, step * per_step):
            epoch, i = divmod(pos, self._per_epoch)
            out.append(self.examples[self._epoch_order(epoch)[i]])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of ``epoch``, drawn once (not once per prompt)."""
        if epoch not in self._orders:
            # a step spans at most two epochs: keep only the newest
            self._orders = {epoch: self._permute(len(self.examples), self.seed, epoch)}
        return self._orders[epoch]
