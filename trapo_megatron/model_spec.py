"""What a model is, read once from its Hugging Face config: its shape and the rules its layers follow.

Plain python (no torch): the planner imports it on a laptop. The Megatron builder, the HF <-> Megatron
mapping, the weight stream, both rollout engines, the planner and `trapo launch` read a :class:`ModelSpec`;
nothing else interprets a config's model fields. Families differ only by the data in :data:`FAMILIES`;
a config.json may omit a field, and then the transformers config class's default applies (the table holds
the defaults that differ between families; transformers 5.x, models/<family>/configuration_<family>.py).
Every refusal is a ValueError naming the config field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """What a supported ``model_type`` fixes; the rest is read from the config."""

    qkv_bias: bool | None
    """Bias on the Q/K/V projections; None: the config's ``attention_bias`` decides."""
    qk_layernorm: bool
    """RMSNorm over each query and key head before RoPE (Qwen3's q_norm / k_norm)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """The transformers config class's defaults for fields a config.json may leave out."""


# transformers 5.x class defaults shared by the supported families.
COMMON_DEFAULTS: dict[str, Any] = {
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "use_sliding_window": False, "initializer_range": 0.02, "attention_dropout": 0.0,
    "head_dim": None, "rope_theta": 10000.0,
}

FAMILIES: dict[str, Family] = {
    "qwen2": Family(qkv_bias=True, qk_layernorm=False, defaults={"max_position_embeddings": 32768}),
    "llama": Family(qkv_bias=None, qk_layernorm=False, defaults={"max_position_embeddings": 2048}),
    "qwen3": Family(qkv_bias=None, qk_layernorm=True, defaults={"max_position_embeddings": 32768, "head_dim": 128}),
}

MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
"""Config fields that make a model a mixture of experts (Qwen2/3-MoE, Mixtral, DeepSeek)."""

ACTIVATIONS = ("silu",)
"""MLP activations of the supported families: SwiGLU (gate and up projections, silu)."""

LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""Llama 3 RoPE scaling parameters megatron-core 0.19.2 hard-codes (models/common/embeddings/
rotary_pos_embedding.py, _apply_scaling); only ``factor`` is a constructor argument."""


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: base and scaling."""

    theta: float
    scaling: str = "default"
    """"default" (none) or "llama3"."""
    factor: float = 1.0
    """Llama 3 scaling factor."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A decoder-only transformer in Megatron's terms, read from a Hugging Face config."""

    name: str
    """A label for tables and reports."""
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads; equal to the query heads without grouped-query attention."""
    head_dim: int
    vocab_size: int
    """Vocabulary before any padding."""
    max_position_embeddings: int
    qkv_bias: bool
    qk_layernorm: bool
    tied_embeddings: bool
    """The output layer is the word embedding."""
    norm_eps: float
    activation: str
    rope: Rope
    init_std: float = 0.02
    attention_dropout: float = 0.0

    @property
    def heads(self) -> tuple[int, int]:
        return self.num_attention_heads, self.num_query_groups

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    def is_tied_head(self, hf_name: str) -> bool:
        return is_tied_head(hf_name, self.tied_embeddings)


LM_HEAD = "lm_head.weight"
"""The Hugging Face name of the output layer; a tied model's weights need not hold it."""


def is_tied_head(hf_name: str, tied: bool) -> bool:
    """Whether ``hf_name`` is a tied output layer: it IS the embedding, so no weight stream or rollout
    engine sends it on its own (vLLM's loader refuses it alone, model_executor/models/utils.py)."""
    return tied and hf_name == LM_HEAD


def ties_embeddings(cfg: Mapping[str, Any] | Any) -> bool:
    """A config's ``tie_word_embeddings``, or its family's class default when the config leaves it out."""
    family = FAMILIES.get(_field(cfg, "model_type"), Family(qkv_bias=None, qk_layernorm=False))
    return bool(_Reader(cfg, family).get("tie_word_embeddings"))


def _field(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


class _Reader:
    """Fields of a config dict or object, with the family's defaults; errors name the field."""

    def __init__(self, cfg: Mapping[str, Any] | Any, family: Family) -> None:
        self.cfg, self.defaults = cfg, {**COMMON_DEFAULTS, **family.defaults}

    def raw(self, key: str) -> Any:
        return _field(self.cfg, key)

    def get(self, key: str) -> Any:
        value = self.raw(key)
        return self.defaults.get(key) if value is None else value

    def positive(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(key, value, "must be a positive integer" if value is not None else "is missing")
        return value


def bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"unsupported Hugging Face config: {key}={value!r}: {why}")


def _rope(read: _Reader) -> Rope:
    """transformers 5.x keeps RoPE settings in ``rope_parameters``; 4.x in ``rope_theta`` / ``rope_scaling``."""
    params = dict(read.raw("rope_parameters") or {})
    params.setdefault("rope_theta", read.get("rope_theta"))
    scaling = read.raw("rope_scaling")
    if scaling and "rope_type" not in params:
        params.update(scaling)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ("default", "llama3"):
        raise bad("rope_scaling", params, f"rope_type {kind!r} is not supported (default, llama3)")
    if kind == "llama3":
        for key, want in LLAMA3_FIXED.items():
            if float(params.get(key, want)) != want:
                raise bad("rope_scaling", params, f"llama3 {key} must be {want} (megatron-core's fixed value)")
    return Rope(theta=float(params["rope_theta"]), scaling=kind, factor=float(params.get("factor", 1.0)))


def from_hf_config(cfg: Mapping[str, Any] | Any | str | os.PathLike, name: str | None = None) -> ModelSpec:
    """The spec of a config.json dict, a transformers PretrainedConfig (or any object with its attributes),
    a ModelSpec (returned as is), or a path to config.json or the folder holding it."""
    if isinstance(cfg, ModelSpec):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        path = path / "config.json" if path.is_dir() else path
        cfg = json.loads(path.read_text())
    model_type = _field(cfg, "model_type")
    moe = [f for f in MOE_FIELDS if _field(cfg, f)]
    if moe or "moe" in str(model_type):
        key = moe[0] if moe else "model_type"
        raise bad(key, _field(cfg, key), "mixture-of-experts models are not supported (dense Qwen2/2.5, Qwen3 "
                  "and Llama 3 only)")
    if model_type not in FAMILIES:
        raise bad("model_type", model_type, f"supported families are {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    read = _Reader(cfg, family)
    sizes = {k: read.positive(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                           "num_attention_heads", "vocab_size")}
    heads = sizes["num_attention_heads"]
    groups = read.raw("num_key_value_heads") or heads
    if heads % groups:
        raise bad("num_key_value_heads", groups, f"must divide num_attention_heads={heads}")
    if read.get("hidden_act") not in ACTIVATIONS:
        raise bad("hidden_act", read.get("hidden_act"), "only SwiGLU (silu) MLPs are supported")
    if read.get("mlp_bias"):
        raise bad("mlp_bias", True, "MLP biases are not supported")
    if read.get("use_sliding_window"):
        raise bad("use_sliding_window", True, "sliding-window attention is not supported")
    head_dim = read.get("head_dim") or sizes["hidden_size"] // heads
    return ModelSpec(
        name=name or read.raw("_name_or_path") or model_type,
        model_type=model_type,
        num_layers=sizes["num_hidden_layers"],
        hidden_size=sizes["hidden_size"],
        ffn_hidden_size=sizes["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=read.get("max_position_embeddings"),
        qkv_bias=bool(read.get("attention_bias")) if family.qkv_bias is None else family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        tied_embeddings=ties_embeddings(cfg),
        norm_eps=float(read.get("rms_norm_eps")),
        activation=read.get("hidden_act"),
        rope=_rope(read),
        init_std=float(read.get("initializer_range")),
        attention_dropout=float(read.get("attention_dropout") or 0.0),
    )


def pipeline_stages(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers per pipeline stage as megatron-core 0.19.2 places them (transformer/transformer_block.py
    get_num_layers_to_build): ``first`` / ``last`` layers on the first / last stage when given, the rest
    split evenly over the other stages. ValueError naming the knob when that is impossible."""
    knobs = "parallel.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
    if pp == 1:
        if first is not None or last is not None:
            raise ValueError(f"{knobs} need parallel.pipeline_model_parallel_size > 1")
        return [num_layers]
    for knob, value in (("first", first), ("last", last)):
        if value is not None and value <= 0:
            raise ValueError(f"parallel.num_layers_in_{knob}_pipeline_stage={value} must be positive")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest == 0)):
        if first is None and last is None:
            raise ValueError(f"parallel.pipeline_model_parallel_size={pp} does not divide the model's "
                             f"num_hidden_layers={num_layers}; set {knobs} for uneven stages")
        raise ValueError(f"{knobs} = {first} / {last} leave {rest} of the model's {num_layers} layers for "
                         f"{middle} middle stage(s) of PP={pp}: they must split evenly, at least one each")
    each = rest // middle if middle else 0
    return [first if first is not None else each, *([each] * (pp - 2)), last if last is not None else each]


def check_parallel(spec: ModelSpec, tp: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """ValueError naming the parallel knob when ``spec`` cannot run at TP x PP; the layers per stage."""
    for what, value in (("num_attention_heads", spec.num_attention_heads), ("num_key_value_heads",
                        spec.num_query_groups), ("vocab_size", spec.vocab_size),
                        ("intermediate_size", spec.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"parallel.tensor_model_parallel_size={tp} does not divide the model's {what}={value}")
    return pipeline_stages(spec.num_layers, pp, first, last)
