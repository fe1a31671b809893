"""The plan of the run a config executes: ONE translation from a TrapoConfig to the planner's terms, shared by
`trapo plan --config` and `trapo launch`'s pre-submit check.

Each planner input comes from the config field the trainer reads: tokens per micro-batch are
``run.max_tokens_per_micro_batch`` (the trainer packs sequences up to it), recompute is
``model.recompute_activations``, the dtype ``model.dtype``, the layout ``parallel.*`` (uneven stages
included), the engine's TP ``engine.tensor_parallel_size``, its memory ``engine.vllm_gpu_memory_utilization``
of the GPU, what is offloaded while it runs ``engine.offload_during_rollout``, the KV sequence length
``data.max_prompt_tokens + rollout.max_response_tokens``, the optimizer ``optimizer.use_distributed_optimizer``,
the output layer ``loss.fused_output_layer`` / ``loss.fused_output_grads``, and sequence parallelism what megatron/features.py decides for ``model.transformer_impl`` on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trapo_megatron import model_spec
from trapo_megatron.model_spec import ModelSpec
from trapo_megatron.plan.memory import (
    DTYPE_PRECISION,
    Fit,
    Layout,
    Memory,
    PlanConfig,
    evaluate,
    layout_memory,
)


@dataclass(frozen=True)
class RunPlan:
    """The configured layout's memory and whether it fits."""

    spec: ModelSpec
    config: PlanConfig
    layout: Layout
    memory: Memory
    """The busiest pipeline stage, at the configured recompute."""
    fit: Fit | None
    """None: the run does not fit as configured."""


def plan_config(cfg: Any, num_gpus: int, gpus_per_node: int, gpu: str = "h100-80gb",
                gpu_memory_gib: float | None = None) -> PlanConfig:
    """The planner's inputs for the TrapoConfig ``cfg`` on ``num_gpus`` GPUs (see the module docstring)."""
    engine_tp = cfg.engine.tensor_parallel_size or cfg.parallel.tensor_model_parallel_size
    return PlanConfig(
        gpu=gpu, gpu_memory_gib=gpu_memory_gib, num_gpus=num_gpus, gpus_per_node=min(gpus_per_node, num_gpus),
        precision=DTYPE_PRECISION[cfg.model.dtype],
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        micro_batch_size=1, seq_length=cfg.run.max_tokens_per_micro_batch,
        transformer_impl=cfg.model.transformer_impl, recompute=cfg.model.recompute_activations,
        num_layers_in_first_pipeline_stage=cfg.parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=cfg.parallel.num_layers_in_last_pipeline_stage,
        colocate_vllm=cfg.engine.kind == "vllm", rollout_tp=engine_tp,
        rollout_len=cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens,
        vllm_memory_fraction=cfg.engine.vllm_gpu_memory_utilization,
        offload_during_rollout=cfg.engine.offload_during_rollout,
        output_layer=cfg.loss.fused_output_grads if cfg.loss.fused_output_layer else "unfused",
    )


def model_of(cfg: Any, preset: str | None = None) -> ModelSpec | None:
    """The spec of ``model.hf_path``'s config.json; where it is not readable here (a cluster path), the
    planner preset ``preset``, else the preset named like the folder (``/models/Qwen3-8B``: qwen3-8b);
    None: none of them."""
    from trapo_megatron.plan.model import PRESETS

    path = Path(cfg.model.hf_path)
    if (path / "config.json").is_file():
        return model_spec.from_hf_config(path, name=path.name)
    preset = preset or path.name.lower()
    return PRESETS.get(preset)


def plan_run(cfg: Any, spec: ModelSpec, num_gpus: int, gpus_per_node: int, gpu: str = "h100-80gb",
             gpu_memory_gib: float | None = None) -> RunPlan:
    """The configured run's layout and memory; ValueError naming the knob when the layout cannot exist."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    model_spec.check_parallel(spec, tp, pp, *par.pipeline_split)
    if num_gpus % (tp * pp):
        raise ValueError(f"--gpus {num_gpus} is not a multiple of parallel.tensor_model_parallel_size x "
                         f"pipeline_model_parallel_size = {tp} x {pp}")
    pcfg = plan_config(cfg, num_gpus, gpus_per_node, gpu, gpu_memory_gib)
    layout = Layout(tp=tp, pp=pp, dp=num_gpus // (tp * pp))
    return RunPlan(spec=spec, config=pcfg, layout=layout, memory=layout_memory(spec, pcfg, layout),
                   fit=evaluate(spec, pcfg, layout))
