"""The one transformer-implementation decision (megatron/features.py): its table, the loud TE failure on a
CUDA machine, detection through transformer_engine.pytorch, the TransformerConfig it sets and the planner
reading the same sequence-parallel decision. TE availability and CUDA are monkeypatched: this runs on CPU."""

import sys
import types

import pytest

from trapo_megatron.megatron import features
from trapo_megatron.megatron.features import decide


def test_the_table():
    te = decide("auto", 2, cuda=True, te_error=None, grad_accum_kernel=True)
    assert (te.transformer_engine, te.fusions, te.gradient_accumulation_fusion, te.sequence_parallel) == (
        True, True, True, True)
    assert decide("te", 1, cuda=True, te_error=None, grad_accum_kernel=True).sequence_parallel is False
    no_apex = decide("te", 4, cuda=True, te_error=None, grad_accum_kernel=False)
    assert no_apex.fusions and no_apex.sequence_parallel and not no_apex.gradient_accumulation_fusion
    for local in (decide("auto", 2, cuda=False, te_error="x", grad_accum_kernel=False),
                  decide("local", 2, cuda=True, te_error=None, grad_accum_kernel=True)):
        assert (local.transformer_engine, local.fusions, local.gradient_accumulation_fusion,
                local.sequence_parallel) == (False, False, False, True)  # SP on the local spec too (norms.py)
        assert local.reason == "sequence parallel: on (TP > 1)"
    assert decide("local", 1, cuda=False, te_error=None, grad_accum_kernel=False).sequence_parallel is False
    with pytest.raises(ValueError, match="transformer_impl=te needs a CUDA GPU"):
        decide("te", 2, cuda=False, te_error=None, grad_accum_kernel=False)
    with pytest.raises(ValueError, match="model.transformer_impl must be one of"):
        decide("TE", 2, cuda=True, te_error=None, grad_accum_kernel=False)


def test_a_broken_te_on_cuda_is_an_error_naming_the_package_and_the_fix():
    with pytest.raises(RuntimeError) as err:
        decide("auto", 2, cuda=True, te_error="OSError: undefined symbol: _ZN3c10", grad_accum_kernel=False)
    msg = str(err.value)
    assert "import transformer_engine.pytorch" in msg and "undefined symbol" in msg
    assert "transformer-engine[pytorch]" in msg and "model.transformer_impl: local" in msg


def test_detection_imports_the_torch_extension_not_the_meta_package(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))  # imports
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # the extension does not
    with pytest.raises(RuntimeError, match="transformer_engine.pytorch"):
        features.detect("auto", 2)
    assert features.detect("local", 2).transformer_engine is False  # the explicit opt-out builds
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch"))
    assert features.detect("auto", 2).sequence_parallel is True


def test_transformer_config_takes_the_decision():
    from _megatron_helpers import tiny_hf_config

    from trapo_megatron.megatron import model_builder, platform

    par = platform.ParallelConfig()
    local = model_builder.features_kwargs(decide("auto", 1, cuda=False, te_error=None, grad_accum_kernel=False))
    te = model_builder.features_kwargs(decide("te", 2, cuda=True, te_error=None, grad_accum_kernel=True))
    assert set(local) == set(te) == {*model_builder.FUSIONS, "sequence_parallel", "gradient_accumulation_fusion"}
    assert not any(local.values()) and all(te.values())
    cfg = model_builder.transformer_config_from_hf(tiny_hf_config("qwen2"), par)  # CPU: auto means local
    assert not cfg.sequence_parallel and not cfg.apply_rope_fusion and not cfg.gradient_accumulation_fusion


def test_the_planner_reads_the_same_sequence_parallel_decision():
    from trapo_megatron.plan.memory import Layout, PlanConfig, stage_memory
    from trapo_megatron.plan.model import PRESETS

    spec, lay = PRESETS["qwen2.5-math-7b"], Layout(tp=4, pp=1, dp=2)
    te = stage_memory(spec, PlanConfig(num_gpus=8), lay, 0)
    local = stage_memory(spec, PlanConfig(num_gpus=8, transformer_impl="local"), lay, 0)
    assert local.activations == te.activations  # both split norm / dropout activations over TP (SP on)
    with pytest.raises(ValueError, match="PlanConfig.transformer_impl"):
        PlanConfig(transformer_impl="auto")
