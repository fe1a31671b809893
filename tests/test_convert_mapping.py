"""The mapping table against the tensors transformers actually creates, and its validation messages."""

import pytest
from _convert_helpers import CASES, hf_config, hf_model

from trapo_megatron import model_spec
from trapo_megatron.convert import mapping


@pytest.mark.parametrize("family,tied", CASES)
def test_hf_shapes_match_transformers(family, tied):
    model = hf_model(family, tied)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    dims = model_spec.from_hf_config(model.config)
    assert mapping.hf_shapes(dims) == state
    assert dims.qkv_bias == (family == "qwen2")


@pytest.mark.parametrize("family,tied", CASES)
@pytest.mark.parametrize("spec", list(mapping.Spec))
def test_walk_covers_every_hf_tensor_once(family, tied, spec):
    dims = model_spec.from_hf_config(hf_config(family, tied).to_dict())
    names = [h for e in mapping.expanded(dims, spec) for h in e.hf]
    assert len(names) == len(set(names))
    assert set(names) == set(mapping.hf_shapes(dims))
    table = mapping.entries(dims, spec)
    fused = [e.mcore for e in table if e.hf[0].endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))]
    assert len(fused) == 2 and all(("layer_norm_weight" in n) == (spec is mapping.Spec.TE) for n in fused)
    # Qwen3's q/k norms are modules of their own in both specs (TENorm / the local RMSNorm)
    qk = sorted(e.mcore for e in table if e.hf[0].endswith(("q_norm.weight", "k_norm.weight")))
    want = [f"decoder.layers.*.self_attention.{x}_layernorm.weight" for x in "kq"]
    assert qk == (want if family == "qwen3" else [])


def test_check_names_missing_extra_and_misshaped_tensors():
    dims = model_spec.from_hf_config(hf_config("qwen2", False).to_dict())
    found = dict(mapping.hf_shapes(dims))
    found.pop("model.layers.1.self_attn.k_proj.bias")
    found["model.layers.9.mlp.up_proj.weight"] = (128, 64)
    found["model.embed_tokens.weight"] = (100, 64)
    with pytest.raises(ValueError) as err:
        mapping.check_hf_tensors(dims, found)
    msg = str(err.value)
    assert "1 missing: ['model.layers.1.self_attn.k_proj.bias']" in msg
    assert "1 unexpected: ['model.layers.9.mlp.up_proj.weight']" in msg
    assert "model.embed_tokens.weight: checkpoint (100, 64) vs config (96, 64)" in msg


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt2", "model_type"), ("num_key_value_heads", 3, "num_key_value_heads"),
    ("mlp_bias", True, "mlp_bias"), ("hidden_size", 0, "hidden_size"),
])
def test_unsupported_config_names_the_field(field, value, match):
    cfg = hf_config("llama", False).to_dict()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        model_spec.from_hf_config(cfg)
