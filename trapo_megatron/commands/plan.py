"""`trapo plan`: which TP x PP x DP layouts of a model fit a GPU cluster, and the memory behind the answer.

Wired into the `trapo` command by :mod:`trapo_megatron.commands` through :func:`add_plan_arguments` and
:func:`run_plan`; ``python -m trapo_megatron.plan`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from trapo_megatron.offload_modes import OFFLOAD_MODES
from trapo_megatron.plan.memory import (
    GIB,
    GPUS,
    OUTPUT_LAYERS,
    PRECISIONS,
    Fit,
    Memory,
    PlanConfig,
    all_layouts,
    plan,
    stage_memory,
)
from trapo_megatron.plan.model import PRESETS, ModelSpec, resolve_model, total_params
from trapo_megatron.plan.run import RunPlan, model_of, plan_run


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trapo plan`."""
    d = PlanConfig()
    parser.add_argument("--model", default=None,
                        help=f"preset ({', '.join(PRESETS)}) or a Hugging Face config.json / model folder; with "
                             "--config: the model when model.hf_path is not readable here")
    parser.add_argument("--config", action="append", default=None,
                        help="plan the run this training YAML configures (repeatable, later files win), at its "
                             "own layout, micro-batch tokens, recompute, dtype, engine TP, vLLM memory and offload")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. parallel.pipeline_model_"
                        "parallel_size=2")
    parser.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), help="GPU type (default %(default)s)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU (nvidia-smi's total) instead of the --gpu type's")
    parser.add_argument("--gpus", "--num-gpus", dest="num_gpus", type=int, default=d.num_gpus,
                        help="GPUs in the job (default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                        help="GPUs per node; TP stays inside one (default %(default)s)")
    parser.add_argument("--seq-length", type=int, default=d.seq_length,
                        help="training tokens per sequence, prompt + response (default %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=d.micro_batch_size,
                        help="sequences per micro-batch (default %(default)s)")
    parser.add_argument("--precision", default=d.precision, choices=sorted(PRECISIONS))
    parser.add_argument("--rollout-tp", type=int, default=None,
                        help="vLLM tensor parallel size (default: the training TP)")
    parser.add_argument("--rollout-seqs", type=int, default=d.rollout_seqs,
                        help="concurrent sequences per vLLM engine (default %(default)s)")
    parser.add_argument("--rollout-len", type=int, default=None,
                        help="tokens per rollout sequence in the KV cache (default: --seq-length)")
    parser.add_argument("--no-vllm", action="store_true", help="no colocated vLLM engine")
    parser.add_argument("--offload", default=d.offload_during_rollout, choices=OFFLOAD_MODES,
                        help="training state in host memory while vLLM runs, as engine.offload_during_rollout "
                             "(default %(default)s)")
    parser.add_argument("--output-layer", default=d.output_layer, choices=OUTPUT_LAYERS,
                        help="the output layer and loss: fused with gradients in forward, fused recomputing in "
                             "backward, auto (the trainer's default: forward, its weight gradient summed into DDP's fp32 main "
                             "grads; recompute when those are 16-bit), or "
                             "unfused logits, as loss.fused_output_layer / loss.fused_output_grads "
                             "(default %(default)s)")
    parser.add_argument("--no-distributed-optimizer", action="store_true",
                        help="optimizer states replicated on every DP rank")
    parser.add_argument("--reserve-gib", type=float, default=d.reserve_gib,
                        help="GiB held back per GPU for CUDA context and NCCL (default %(default)s)")
    parser.add_argument("--all", action="store_true", help="also list the layouts that do not fit")
    parser.add_argument("--json", default=None, help="write the plan as JSON to this file")


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    return PlanConfig(
        gpu=args.gpu, gpu_memory_gib=args.gpu_memory, num_gpus=args.num_gpus, gpus_per_node=min(args.gpus_per_node, args.num_gpus),
        precision=args.precision, micro_batch_size=args.micro_batch, seq_length=args.seq_length,
        rollout_tp=args.rollout_tp, rollout_seqs=args.rollout_seqs, rollout_len=args.rollout_len,
        colocate_vllm=not args.no_vllm, offload_during_rollout=args.offload, output_layer=args.output_layer,
        distributed_optimizer=not args.no_distributed_optimizer, reserve_gib=args.reserve_gib,
    )


COLUMNS = ("layout", "stage", "weights", "grads", "optim", "act", "act(rc)", "logits", "vllm_w", "kv",
           "train", "rollout", "fit", "max_mb", "max_seq", "max_seqs")


def _row(mem: Memory, fit: Fit | None, unit: int) -> list[str]:
    lay = mem.layout
    if fit is None:
        verdict, extra = "no", ["-", "-", "-"]
    else:
        verdict = ("recompute" if fit.recompute else "yes") + (" (tight)" if fit.tight else "")
        extra = [str(fit.max_micro_batch), str(fit.max_seq_length), str(fit.max_rollout_seqs)]
    recompute = fit.recompute if fit else True
    sizes = (mem.weights, mem.grads, mem.optimizer, mem.activations, mem.activations_recompute, mem.logits,
             mem.vllm_weights, mem.kv_cache, mem.train(recompute), mem.rollout)
    return [f"TP{lay.tp}xPP{lay.pp}xDP{lay.dp}", str(mem.stage), *(f"{x / unit:.1f}" for x in sizes),
            verdict, *extra]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _byte_fields(mem: Memory) -> dict[str, int]:
    return {k: v for k, v in asdict(mem).items() if isinstance(v, int) and not isinstance(v, bool)}


def _unit(spec: ModelSpec) -> tuple[int, str]:
    return (GIB, "GiB") if total_params(spec) > 1e8 else (1024**2, "MiB")


def _count(spec: ModelSpec) -> str:
    n = total_params(spec)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def report(spec: ModelSpec, cfg: PlanConfig, show_all: bool = False) -> tuple[str, dict]:
    """The printed table (GiB per GPU, busiest pipeline stage) and a JSON-ready dict."""
    fits = plan(spec, cfg)
    by_layout = {f.memory.layout: f for f in fits}
    unit, unit_name = _unit(spec)
    rows = [_row(f.memory, f, unit) for f in fits]
    if show_all:
        rows += [_row(m, None, unit) for m in all_layouts(spec, cfg) if m.layout not in by_layout]
    head = (f"{spec.name}: {_count(spec)} parameters on {cfg.num_gpus} x {cfg.gpu} "
            f"({cfg.capacity_bytes / GIB:.1f} GiB usable each), seq {cfg.seq_length}, micro-batch "
            f"{cfg.micro_batch_size}, {cfg.precision}; {unit_name} per GPU, best layout first")
    body = format_table(rows) if rows else "no layout fits: add GPUs or shorten --seq-length / --rollout-len"
    data = {
        "model": asdict(spec), "config": asdict(cfg), "total_params": total_params(spec),
        "layouts": [
            {"tp": f.memory.layout.tp, "pp": f.memory.layout.pp, "dp": f.memory.layout.dp,
             "recompute": f.recompute, "tight": f.tight, "headroom": f.headroom,
             "max_micro_batch": f.max_micro_batch, "max_seq_length": f.max_seq_length,
             "max_rollout_seqs": f.max_rollout_seqs,
             "bytes": _byte_fields(f.memory),
             "train_peak": f.memory.train(f.recompute), "rollout_peak": f.memory.rollout}
            for f in fits
        ],
    }
    return f"{head}\n{body}", data


def report_run(run: RunPlan) -> tuple[str, dict]:
    """The configured run: every stage of its layout (GiB per GPU) and whether it fits, and a JSON-ready dict."""
    cfg, lay = run.config, run.layout
    stages = [stage_memory(run.spec, cfg, lay, s) for s in range(lay.pp)]
    recompute = bool(cfg.recompute)
    unit, unit_name = _unit(run.spec)
    engine = (f"vLLM TP{cfg.rollout_tp} with {cfg.vllm_memory_fraction} of the GPU, offload "
              f"{cfg.offload_during_rollout}" if cfg.colocate_vllm else "no colocated vLLM")
    head = (f"{run.spec.name}: {_count(run.spec)} parameters at {lay} on {cfg.num_gpus} GPUs of "
            f"{cfg.gpu_bytes / GIB:.1f} GiB ({cfg.capacity_bytes / GIB:.1f} usable), {cfg.seq_length} tokens per "
            f"micro-batch, {cfg.precision}, recompute {'on' if recompute else 'off'}, {engine}; {unit_name} per GPU")
    rows = [_row(m, run.fit, unit) for m in stages]
    verdict = ("fits" if run.fit and not run.fit.tight else "fits, tight" if run.fit else "does NOT fit")
    data = {"model": asdict(run.spec), "config": asdict(cfg), "layout": asdict(lay), "fits": run.fit is not None,
            "tight": bool(run.fit and run.fit.tight), "busiest_stage": run.memory.stage,
            "stages": [{"stage": m.stage, "bytes": _byte_fields(m), "train_peak": m.train(recompute),
                        "rollout_peak": m.rollout} for m in stages]}
    return f"{head}\n{format_table(rows)}\n{lay}: {verdict}", data


def _plan_of_config(args: argparse.Namespace) -> RunPlan:
    from trapo_megatron.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    spec = resolve_model(args.model) if args.model else model_of(cfg)
    if spec is None:
        raise ValueError(f"model.hf_path={cfg.model.hf_path} has no config.json here and names no preset; "
                         "give --model PRESET_OR_CONFIG")
    return plan_run(cfg, spec, args.num_gpus, args.gpus_per_node, args.gpu, args.gpu_memory)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 1 when nothing fits."""
    from trapo_megatron.config import ConfigError

    try:
        if args.config:
            text, data = report_run(_plan_of_config(args))
        else:
            if not args.model or args.overrides:
                raise ValueError("give --model (every layout of a model) or --config RUN.yaml [overrides] "
                                 "(the run it configures)")
            text, data = report(resolve_model(args.model), config_from_args(args), show_all=args.all)
    except (ValueError, ConfigError) as e:
        print(f"trapo plan: {e}", file=sys.stderr)
        return 2
    fits = data["fits"] if args.config else bool(data["layouts"])
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trapo plan", description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))
