"""`trapo plan --config` plans the run the config executes, with the numbers `trapo launch` checks: each
example YAML at its own layout, micro-batch tokens, recompute, dtype, engine TP, vLLM memory and offload."""

from __future__ import annotations

import json
import re

import pytest

from trapo_megatron.commands import plan as plan_command
from trapo_megatron.config import load
from trapo_megatron.launch import checks
from trapo_megatron.plan.memory import GIB, PRECISIONS
from trapo_megatron.plan.model import PRESETS
from trapo_megatron.plan.run import plan_run
from trapo_megatron.train.config import TrapoConfig

PAPER = "examples/qwen2.5-math-7b_trapo.yaml"
# (the config files as `trapo launch` layers them, GPUs of the run)
EXAMPLES = {
    "qwen2.5-math-7b": ([PAPER], 8),
    "qwen2.5-32b": ([PAPER, "examples/qwen2.5-32b_trapo.yaml"], 32),
    "qwen2.5-72b": ([PAPER, "examples/qwen2.5-72b_trapo.yaml"], 64),
    "qwen3-8b": ([PAPER, "examples/qwen3-8b_trapo.yaml"], 8),
    "tiny-cpu": (["examples/tiny_cpu.yaml"], 2),
    "official": ([PAPER, "examples/trapo_official.yaml"], 8),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_plan_of_each_example_is_the_configured_run(name: str, tmp_path, capsys) -> None:
    files, gpus = EXAMPLES[name]
    out = tmp_path / "plan.json"
    argv = [arg for f in files for arg in ("--config", f)] + ["--gpus", str(gpus), "--json", str(out)]
    assert plan_command.main(argv) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    cfg = load(TrapoConfig, files, [])
    plan = json.loads(out.read_text())
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    assert plan["layout"] == {"tp": tp, "pp": pp, "dp": gpus // (tp * pp)} and plan["fits"]
    assert f"TP{tp} x PP{pp} x DP{gpus // (tp * pp)}: fits" in text and len(plan["stages"]) == pp
    planned = plan["config"]
    assert planned["micro_batch_size"] * planned["seq_length"] == cfg.run.max_tokens_per_micro_batch
    assert planned["recompute"] is cfg.model.recompute_activations
    assert PRECISIONS[planned["precision"]]["weight"] == {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]
    assert planned["distributed_optimizer"] is cfg.optimizer.use_distributed_optimizer
    assert planned["offload_during_rollout"] == cfg.engine.offload_during_rollout
    assert planned["colocate_vllm"] is (cfg.engine.kind == "vllm")
    assert planned["rollout_tp"] == (cfg.engine.tensor_parallel_size or tp)
    assert planned["vllm_memory_fraction"] == cfg.engine.vllm_gpu_memory_utilization
    assert planned["rollout_len"] == cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    if cfg.engine.kind == "vllm":  # vLLM takes its fraction of the GPU, weights and KV cache together
        for stage in plan["stages"]:
            engine = stage["bytes"]["vllm_weights"] + stage["bytes"]["kv_cache"]
            assert engine == int(cfg.engine.vllm_gpu_memory_utilization * 79.6 * GIB)


def test_launch_check_uses_the_plans_numbers(capsys) -> None:
    """A run that does not fit: launch's warning states the peak `trapo plan --config` prints for the busiest
    stage, and both say the same run at the same layout."""
    files, over = [PAPER, "examples/qwen2.5-72b_trapo.yaml"], ["parallel.pipeline_model_parallel_size=1"]
    cfg = load(TrapoConfig, files, over)
    warning = checks.check_memory(cfg, PRESETS["qwen2.5-72b"], "h100-80gb", 1, 8)
    assert warning.startswith("qwen2.5-72b at TP8 x PP1 x DP1 does not fit a h100-80gb as configured")
    assert plan_command.main(["--config", files[0], "--config", files[1], "--gpus", "8", *over]) == 1
    row = capsys.readouterr().out.splitlines()[2].split()
    train, rollout = float(row[10]), float(row[11])
    peak = float(re.search(r": ([\d.]+) GiB of", warning).group(1))
    assert peak == pytest.approx(max(train, rollout), abs=0.051)
    run = plan_run(cfg, PRESETS["qwen2.5-72b"], 8, 8)
    assert run.fit is None and peak == pytest.approx(run.memory.peak(True) / GIB, abs=0.051)


def test_recompute_is_planned_as_configured() -> None:
    files = [PAPER]
    on = plan_run(load(TrapoConfig, files, ["model.recompute_activations=true"]), PRESETS["qwen2.5-math-7b"], 8, 8)
    off = plan_run(load(TrapoConfig, files, []), PRESETS["qwen2.5-math-7b"], 8, 8)  # the preset: off
    assert on.fit.recompute and not off.config.recompute
    assert off.fit is None or not off.fit.recompute  # never silently switched on


def test_uneven_stages_are_planned_as_configured() -> None:
    over = ["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_first_pipeline_stage=12"]
    run = plan_run(load(TrapoConfig, [PAPER], over), PRESETS["qwen2.5-math-7b"], 8, 8)
    even = plan_run(load(TrapoConfig, [PAPER], over[:1]), PRESETS["qwen2.5-math-7b"], 8, 8)
    from trapo_megatron.plan.memory import stage_memory

    first = stage_memory(run.spec, run.config, run.layout, 0)
    even_first = stage_memory(even.spec, even.config, even.layout, 0)
    assert first.params < even_first.params  # 12 of 28 layers instead of 14
    with pytest.raises(ValueError, match="num_layers_in_first_pipeline_stage"):
        plan_run(load(TrapoConfig, [PAPER], [over[0], "parallel.num_layers_in_first_pipeline_stage=28"]),
                 PRESETS["qwen2.5-math-7b"], 8, 8)
