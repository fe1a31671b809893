"""The model spec reads a config.json the way transformers' own config classes do, and every consumer (the
builder, the mapping, the planner) refuses the same configs with the same message naming the field."""

from __future__ import annotations

import json

import pytest

from trapo_megatron import model_spec
from trapo_megatron.model_spec import from_hf_config, pipeline_stages

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 96}


@pytest.mark.parametrize("family", sorted(model_spec.FAMILIES))
def test_omitted_fields_take_the_transformers_class_defaults(family: str) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.for_model(family, **BASE)  # transformers fills in its class defaults
    spec = from_hf_config({"model_type": family, **BASE})
    assert spec == from_hf_config(hf)
    assert spec.head_dim == (getattr(hf, "head_dim", None) or 16) == (128 if family == "qwen3" else 16)
    assert (spec.tied_embeddings, spec.norm_eps, spec.max_position_embeddings, spec.rope.theta) == (
        hf.tie_word_embeddings, hf.rms_norm_eps, hf.max_position_embeddings, hf.rope_parameters["rope_theta"])
    assert spec.qk_layernorm == (family == "qwen3")
    assert spec.qkv_bias == (family == "qwen2")


def test_llama3_rope_scaling_is_read_from_either_layout() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = from_hf_config({"model_type": "llama", **BASE, "rope_theta": 5e5, "rope_scaling": scaling})
    v5 = from_hf_config({"model_type": "llama", **BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert v4.rope == v5.rope == model_spec.Rope(theta=5e5, scaling="llama3", factor=8.0)
    with pytest.raises(ValueError, match="llama3 high_freq_factor must be 4.0"):
        from_hf_config({"model_type": "llama", **BASE, "rope_scaling": {**scaling, "high_freq_factor": 2.0}})


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": None}, "num_hidden_layers=None: is missing"),
    ({"hidden_size": 0}, "hidden_size=0: must be a positive integer"),
    ({"model_type": "gpt2"}, "model_type='gpt2': supported families are"),
    ({"model_type": "qwen3_moe"}, "model_type='qwen3_moe': mixture-of-experts"),
    ({"num_experts": 128}, "num_experts=128: mixture-of-experts"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3: must divide"),
])
def test_every_consumer_refuses_a_bad_config_naming_the_field(tmp_path, capsys, change: dict, message: str) -> None:
    from trapo_megatron.commands import plan as plan_command
    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.megatron.model_builder import validate_hf_config
    from trapo_megatron.megatron.platform import ParallelConfig

    cfg = {k: v for k, v in {"model_type": "qwen3", **BASE, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        validate_hf_config(cfg, ParallelConfig())
    with pytest.raises(ValueError, match=message):
        load_hf_into_model([], {}, hf_config=cfg)
    assert plan_command.main(["--model", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("layers,pp,first,last,want", [
    (4, 2, None, None, [2, 2]), (3, 2, 2, None, [2, 1]), (3, 2, None, 1, [2, 1]), (5, 2, 1, None, [1, 4]),
    (7, 3, 1, 2, [1, 4, 2]), (10, 4, 1, None, [1, 3, 3, 3]),
])
def test_pipeline_stages(layers: int, pp: int, first, last, want: list[int]) -> None:
    assert pipeline_stages(layers, pp, first, last) == want


@pytest.mark.parametrize("layers,pp,first,last,message", [
    (3, 2, None, None, "pipeline_model_parallel_size=2 does not divide the model's num_hidden_layers=3"),
    (4, 2, 1, 1, "leave 2 of the model's 4 layers for 0 middle stage"),
    (4, 3, 1, None, "leave 3 of the model's 4 layers for 2 middle stage"),
    (4, 1, 2, None, "need parallel.pipeline_model_parallel_size > 1"),
    (4, 2, 0, None, "num_layers_in_first_pipeline_stage=0 must be positive"),
])
def test_impossible_stages_name_the_knob(layers: int, pp: int, first, last, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipeline_stages(layers, pp, first, last)
