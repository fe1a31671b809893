"""The model builder's config checks: unsupported HF configs and impossible layouts name the field."""

from __future__ import annotations

import pytest
from _megatron_helpers import tiny_hf_config

from trapo_megatron.megatron.model_builder import transformer_config_from_hf, validate_hf_config
from trapo_megatron.megatron.platform import ParallelConfig


@pytest.mark.parametrize("change,needle", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope"),
])
def test_unsupported_configs_name_the_field(change: dict, needle: str) -> None:
    cfg = tiny_hf_config("qwen2")
    for key, value in change.items():
        setattr(cfg, key, value)
    if "rope_scaling" in change:
        cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match=needle):
        validate_hf_config(cfg, ParallelConfig())


def test_unknown_family_is_named() -> None:
    cfg = tiny_hf_config("qwen2")
    cfg.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type"):
        validate_hf_config(cfg, ParallelConfig())


@pytest.mark.parametrize("parallel,needle", [
    (ParallelConfig(tensor_model_parallel_size=8), "tensor_model_parallel_size=8"),
    (ParallelConfig(pipeline_model_parallel_size=3), "pipeline_model_parallel_size=3"),
])
def test_impossible_layouts_name_the_knob(parallel: ParallelConfig, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        validate_hf_config(tiny_hf_config("llama"), parallel)


def test_bad_parallel_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="world size 6"):
        ParallelConfig(tensor_model_parallel_size=4).data_parallel_size(6)


@pytest.mark.parametrize("family,bias", [("qwen2", True), ("llama", False)])
def test_translation_table(family: str, bias: bool) -> None:
    hf = tiny_hf_config(family)
    tc = transformer_config_from_hf(hf, ParallelConfig(tensor_model_parallel_size=2))
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (4, 64, 128)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 16)
    assert tc.add_qkv_bias is bias and tc.gated_linear_unit and tc.normalization == "RMSNorm"
    assert tc.tensor_model_parallel_size == 2 and tc.calculate_per_token_loss
