"""The policy on Megatron-Core: built from an HF checkpoint, trained with the TRAPO loss, streamed to the
rollout engine, saved and resumed as a Megatron distributed checkpoint.

Everything Megatron-specific the trainer needs is behind this class; the trainer itself never imports
megatron.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron import faults
from trapo_megatron.algo.loss import LossConfig, trapo_loss
from trapo_megatron.megatron import fused_output, model_builder, platform, step

OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronPolicy:
    """This rank's stage of the policy, wrapped in Megatron DDP with the (distributed) optimizer."""

    def __init__(self, hf_config: Any, hf_path: str, model_cfg: model_builder.ModelConfig,
                 parallel: platform.ParallelConfig, optim_cfg: step.OptimizerConfig, total_steps: int) -> None:
        from megatron.core import parallel_state as ps

        from trapo_megatron.convert.model_io import load_hf_into_model

        self.hf_config = hf_config
        chunks = model_builder.build_model(hf_config, parallel, model_cfg.dtype, model_cfg.recompute_activations,
                                           model_cfg.transformer_impl)
        load_hf_into_model(chunks, hf_path, hf_config=hf_config, tp_group=ps.get_tensor_model_parallel_group())
        self.chunks = step.wrap_ddp(chunks, optim_cfg.use_distributed_optimizer)
        self.optimizer, self.scheduler = step.build_optimizer(self.chunks, optim_cfg, total_steps)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.is_first_stage = ps.is_pipeline_first_stage()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.mp_rank = ps.get_model_parallel_group().rank()
        self.nonfinite = ""
        """Which quantity of the last train_step was non-finite ("" when its update was applied)."""

    # ------------------------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[step.MicroBatch], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step over this DP rank's micro-batches; returns metric SUMS over the global batch
        (identical on every rank) plus grad_norm and lr."""
        for c in self.chunks:
            c.train()
        step.zero_grad(self.chunks, self.optimizer)

        fused = loss_cfg.fused_output_layer

        def loss_fn(output: torch.Tensor, mb: step.MicroBatch):  # logits, or hidden states when fused
            if fused:
                loss, metrics = fused_output.trapo_loss_from_hidden(output, self.chunks[-1], mb, loss_cfg,
                                                                    self.tp_group)
            else:
                loss, metrics = trapo_loss(output, mb, loss_cfg, tp_group=self.tp_group)
            return (loss * float("nan") if faults.fire("loss") else loss), metrics

        reported = step.forward_backward(self.chunks, micro_batches, loss_fn, hidden_states=fused)
        applied, grad_norm, self.nonfinite = step.optimizer_step(
            self.optimizer, self.scheduler, loss_finite=self._loss_finite_everywhere(reported))
        sums = self._global_sums(reported)
        sums.update(grad_norm=grad_norm, lr=self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    update_skipped=float(not applied))
        return sums

    @staticmethod
    def _loss_finite_everywhere(reported: list[dict[str, torch.Tensor]]) -> bool:
        """Whether every rank's micro-batch losses are finite (a MAX all-reduce of "some loss is not" over the
        host group: only the last pipeline stage has losses, and a NaN on one TP rank must stop all)."""
        bad = any(not bool(torch.isfinite(r["loss"]).all()) for r in reported)
        flag = torch.tensor([float(bad)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=platform.host_group())
        return not bool(flag.item())

    def _global_sums(self, reported: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum micro-batch metric dicts over this rank's micro-batches, then over DP ranks; hand the result
        from the last pipeline stage to every stage."""
        keys = [sorted(reported[0])] if reported else [None]
        src = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
        dist.broadcast_object_list(keys, src=src, group=self.pp_group)
        names = keys[0]
        # On the device: PP and DP are NCCL groups on a GPU (the loss metrics already live there).
        if reported and self.is_last_stage:
            local = torch.stack([torch.stack([r[k].float().reshape(()) for r in reported]).sum() for k in names])
        else:
            local = torch.zeros(len(names), device=platform.device())
        dist.all_reduce(local, group=self.pp_group)
        dist.all_reduce(local, group=self.dp_group)
        return {k: float(v) for k, v in zip(names, local.tolist())}

    # ------------------------------------------------------------------------------------ weights out
    def hf_weights(self, bucket_bytes: int, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The live stream: every HF-named full tensor, on every rank (collective over TP and PP)."""
        from trapo_megatron.convert.stream import iter_hf_weights

        modules = [getattr(c, "module", c) for c in self.chunks]
        return iter_hf_weights(modules, self.hf_config, tp_group=self.tp_group, pp_group=self.pp_group,
                               bucket_bytes=bucket_bytes, dtype=dtype)

    # ------------------------------------------------------------------------------------ checkpoints
    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        """Model shards + optimizer state. The distributed optimizer saves its buffers per DP rank
        ("dp_reshardable": parallel save/load without gathers; resume keeps the TP x PP layout; HF export and
        `trapo convert` are the way to change it)."""
        model_sd = {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(self.chunks)}
        flat = {k: v for sd in model_sd.values() for k, v in sd.items()}
        optim = self.optimizer.sharded_state_dict(flat, is_loading=is_loading, metadata=OPTIMIZER_CKPT_METADATA)
        return {**model_sd, "optimizer": optim}

    def save(self, directory: Path) -> None:
        """Model + optimizer shards + scheduler into ``directory`` (collective)."""
        from megatron.core import dist_checkpointing

        directory.mkdir(parents=True, exist_ok=True)
        state = self._sharded_state(is_loading=False)
        state["scheduler"] = self.scheduler.state_dict()
        with platform.cuda_literals_on_cpu():
            dist_checkpointing.save(state, str(directory))

    def load(self, directory: Path) -> None:
        """Restore model, optimizer (moments and Adam step) and scheduler from ``directory``."""
        from megatron.core import dist_checkpointing

        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in chained:
            # The distributed optimizer's state (and its Adam step) must exist before a load can fill it in
            # place; megatron-core only does this itself for its FSDP format.
            init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
            if init is not None:
                init()
        state = self._sharded_state(is_loading=True)
        state["scheduler"] = None
        with platform.cuda_literals_on_cpu():
            loaded = dist_checkpointing.load(state, str(directory))
        for i, c in enumerate(self.chunks):
            c.module.load_state_dict(loaded[f"model{i}"])
        with torch.no_grad():  # fp32 main params are views of the model's parameters
            self.optimizer.load_state_dict(loaded["optimizer"])
        for opt in chained:
            _restore_adam_steps(getattr(opt, "optimizer", None))
        self.scheduler.load_state_dict(loaded["scheduler"])


def _restore_adam_steps(inner: Any) -> None:
    """Set every parameter's Adam ``step`` to the saved one, each its own tensor.

    megatron-core's distributed optimizer with torch's Adam (no Apex/TE) saves the step in its param groups
    and marks the per-parameter step tensors "LocalNonpersistentObject" (distrib_optimizer.py,
    sharded_param_state_dp_reshardable), so a load copies the DUMMY step of the freshly initialised state
    (1) over the restored one; load_state_dict also gives all parameters ONE shared tensor ("Native PyTorch
    state dict requires step"), which torch's Adam then increments once per parameter. Either way every
    resumed run restarted Adam's bias correction, and the steps after a resume differed.
    """
    if inner is None:
        return
    for group in inner.param_groups:
        if "step" not in group:
            continue
        for param in group["params"]:
            state = inner.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.full_like(state["step"], float(group["step"]))
