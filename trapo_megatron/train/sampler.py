"""The data order: which prompts make up step ``step``. A seeded permutation per epoch, so a step's batch
depends only on (seed, step) and resuming needs no data-loader state."""

from __future__ import annotations

import random

from trapo_megatron.data.dataset import Example


class StepSampler:
    """The whole step's batch, in its (seed, step) order; positions in it are what replicas and DP ranks split."""

    def __init__(self, examples: list[Example], prompts_per_step: int, seed: int) -> None:
        self.examples = examples
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def batch(self, step: int) -> list[Example]:
        """The ``prompts_per_step`` prompts of step ``step`` (1-based), over every rank."""
        n, per_step = len(self.examples), self.prompts_per_step
        out = []
        for pos in range((step - 1) * per_step, step * per_step):
            epoch, i = divmod(pos, n)
            out.append(self.examples[self._epoch_order(epoch)[i]])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of ``epoch``, shuffled once (not once per prompt)."""
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # a step spans at most two epochs: keep only the newest
        return self._orders[epoch]
