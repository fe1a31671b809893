"""Everything a run needs around the loop: the distributed world, data, the Megatron policy, the rollout
engine and its reward pool, and the collectives that tie them (who generates, how results reach every rank).

Who generates: vLLM runs SPMD on every rank (each tensor-parallel block is one vLLM replica). The CPU twin
runs on the first rank of each model-parallel group only; its rollouts are broadcast to the other ranks of
the group, so every TP/PP rank trains on identical sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.data.dataset import Example, load_for_run
from trapo_megatron.megatron import model_builder, platform
from trapo_megatron.megatron.policy import MegatronPolicy
from trapo_megatron.rollout.engine import SamplingParams
from trapo_megatron.rollout.waves import Rollout, WaveStats, run_waves, stop_token_ids
from trapo_megatron.train.config import TrapoConfig


@dataclass
class RunContext:
    cfg: TrapoConfig
    hf_config: Any
    tokenizer: Any
    policy: MegatronPolicy
    train_examples: list[Example]
    heldout_examples: list[Example]
    engine: Any | None
    """None on ranks that do not generate (CPU twin: all but the model-parallel leader)."""
    scorer: Any | None
    mp_group: Any
    mp_leader: int
    """Global rank of this model-parallel group's first rank."""
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)
    """Cache of the current epoch's data permutation."""

    @property
    def is_rank0(self) -> bool:
        return dist.get_rank() == 0

    # ------------------------------------------------------------------------------------ data
    def prompts_for_step(self, step: int) -> list[Example]:
        """This DP rank's share of step ``step``'s prompts. The global order is a seeded permutation per epoch,
        so a step's prompts depend only on (seed, step): resuming needs no data-loader state."""
        n, per_step = len(self.train_examples), self.cfg.run.prompts_per_step
        out = []
        for pos in range((step - 1) * per_step, step * per_step):
            epoch, i = divmod(pos, n)
            out.append(self.train_examples[self._epoch_order(epoch)[i]])
        return out[self.policy.dp_rank::self.policy.dp_size]

    def _epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of ``epoch``, shuffled once (not once per prompt)."""
        if epoch not in self._orders:
            order = list(range(len(self.train_examples)))
            random.Random(self.cfg.run.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # a step spans at most two epochs: keep only the newest
        return self._orders[epoch]

    # ------------------------------------------------------------------------------------ rollouts
    def roll_out(self, examples: list[Example], step: int) -> tuple[list[list[Rollout]], WaveStats]:
        """Micro-group waves over ``examples`` (one engine call per micro-group), identical on every rank of
        the model-parallel group; the engine sleeps afterwards to leave memory to training."""
        result = None
        if self.engine is not None:
            self.engine.wake_up()
            positions = range(self.policy.dp_rank, self.cfg.run.prompts_per_step, self.policy.dp_size)
            result = run_waves(examples, schedule=self.cfg.micro_groups, engine=self.engine, scorer=self.scorer,
                               tokenizer=self.tokenizer, cfg=self.cfg.rollout, step=step, positions=positions)
            self.engine.sleep()
        return self._from_generator(result)

    def _from_generator(self, obj: Any) -> Any:
        if self.cfg.engine.kind == "vllm":
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.mp_leader, group=self.mp_group)
        return box[0]

    def sync_weights(self) -> None:
        """One pass of the weight stream; every rank takes part (TP gathers, PP hand-overs)."""
        stream = self.policy.hf_weights(self.cfg.engine.weight_bucket_mb * 2**20)
        if self.engine is not None:
            self.engine.load_weights(stream)
        else:
            for _ in stream:
                pass

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """Greedy accuracy on the held-out examples (None without an evaluation file)."""
        if not self.heldout_examples:
            return None
        accuracy = None
        if self.engine is not None:
            budget = self.cfg.evaluation.max_new_tokens or self.cfg.rollout.max_response_tokens
            stop = stop_token_ids(self.tokenizer, self.cfg.rollout)
            params = [SamplingParams(temperature=0.0, max_tokens=budget, seed=i, stop_token_ids=stop)
                      for i in range(len(self.heldout_examples))]
            self.engine.wake_up()  # evaluation follows a refit; the next rollout needs these weights too
            outs = self.engine.generate([ex.prompt_ids for ex in self.heldout_examples], params)
            texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
            scores = self.scorer.score(texts, [ex.answer for ex in self.heldout_examples])
            accuracy = sum(scores) / len(scores)
        return self._from_generator(accuracy)

    # ------------------------------------------------------------------------------------ reductions
    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone().float()
        dist.all_reduce(t, group=self.policy.dp_group)
        return t

    # ------------------------------------------------------------------------------------ export
    def export_hf(self, out_dir: Path) -> None:
        """The final policy as a Hugging Face checkpoint (written by rank 0 from the live weight stream)."""
        from trapo_megatron.convert import hf_io, mapping

        stream = self.policy.hf_weights(self.cfg.engine.weight_bucket_mb * 2**20)
        if self.is_rank0:
            dims = mapping.ModelDims.from_hf_config(self.hf_config.to_dict())
            dtype = model_builder.DTYPES[self.cfg.model.dtype]
            shapes = mapping.hf_shapes(dims)
            plan = [(h, shapes[h], dtype) for entry in mapping.expanded(dims) for h in entry.hf]
            hf_io.write_checkpoint(out_dir, plan, stream, self.cfg.model.hf_path, overwrite=True)
        else:
            for _ in stream:  # every rank takes part in the collectives
                pass
        dist.barrier()

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        if self.engine is not None:
            self.engine.close()
        platform.destroy()


def _load(cfg: TrapoConfig, data_path: str | None, tokenizer: Any, limit: int | None = None,
          heldout: bool = False) -> list[Example]:
    """Rows -> examples (held-out rows need no expert solution); rank 0 prints the load report and writes it
    to <output_dir>/data_report[_heldout].json."""
    if data_path is None:
        return []
    data_cfg = replace(cfg.data, path=data_path, max_rows=limit if limit is not None else cfg.data.max_rows)
    report = Path(cfg.run.output_dir) / f"data_report{'_heldout' if heldout else ''}.json"
    return load_for_run(data_cfg, cfg.prompt, tokenizer, report if dist.get_rank() == 0 else None, not heldout)


def _make_engine(cfg: TrapoConfig, leader: bool) -> Any | None:
    if cfg.engine.kind == "cpu":
        from trapo_megatron.rollout.cpu_engine import CpuEngine

        return CpuEngine.from_pretrained(cfg.model.hf_path) if leader else None
    from trapo_megatron.rollout.vllm_engine import VllmEngine

    max_len = cfg.engine.vllm_max_model_len or cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    return VllmEngine(cfg.model.hf_path, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size,
                      seed=cfg.run.seed, gpu_memory_utilization=cfg.engine.vllm_gpu_memory_utilization,
                      max_model_len=max_len, enforce_eager=cfg.engine.vllm_enforce_eager)


def check_layout(cfg: TrapoConfig, hf_config: Any, world_size: int) -> None:
    """Fail before anything is built when TP/PP cannot split this model on this world."""
    dp = cfg.parallel.data_parallel_size(world_size)
    model_builder.validate_hf_config(hf_config, cfg.parallel)
    if cfg.run.prompts_per_step % dp:
        raise ValueError(f"run.prompts_per_step={cfg.run.prompts_per_step} is not divisible by the data-parallel "
                         f"size {dp}")


def build_context(cfg: TrapoConfig) -> RunContext:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoTokenizer

    from trapo_megatron.reward.math_reward import MathRewardPool

    hf_path = cfg.model.hf_path
    hf_config = AutoConfig.from_pretrained(hf_path)
    platform.initialize(cfg.parallel, seed=cfg.run.seed)
    check_layout(cfg, hf_config, dist.get_world_size())
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    train = _load(cfg, cfg.data.path, tokenizer)
    heldout = _load(cfg, cfg.evaluation.path, tokenizer, cfg.evaluation.max_problems, heldout=True)
    policy = MegatronPolicy(hf_config, hf_path, cfg.model, cfg.parallel, cfg.optimizer, cfg.run.max_steps)
    mp_group = ps.get_model_parallel_group()
    mp_leader = dist.get_global_rank(mp_group, 0)
    generates = cfg.engine.kind == "vllm" or dist.get_rank() == mp_leader
    engine = _make_engine(cfg, generates)
    scorer = MathRewardPool(cfg.reward) if generates else None
    return RunContext(cfg=cfg, hf_config=hf_config, tokenizer=tokenizer, policy=policy, train_examples=train,
                      heldout_examples=heldout, engine=engine, scorer=scorer, mp_group=mp_group, mp_leader=mp_leader)
