"""Hugging Face config (Qwen2 / Qwen2.5, Llama 3) -> megatron-core GPTModel.

The translation is a table of (Megatron field, how to read it from the HF config); family differences
(QKV bias) are a second small table. Which layer spec (Transformer Engine or megatron's local one), which
fusions and whether sequence parallelism runs is one decision (``features``, ``model.transformer_impl``).
Unsupported configs fail with a ValueError naming the HF field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trapo_megatron.megatron import features, norms, platform

# HF model_type -> whether its attention projections carry a bias (None: read config.attention_bias).
QKV_BIAS_BY_FAMILY: dict[str, bool | None] = {"qwen2": True, "llama": None}


def _rope(cfg: Any) -> dict:
    """transformers 5.x keeps rope settings in ``rope_parameters``; 4.x in rope_theta / rope_scaling."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params.update(scaling)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# Megatron TransformerConfig field -> reader of the HF config.
HF_TO_TRANSFORMER_CONFIG: dict[str, Callable[[Any], Any]] = {
    "num_layers": lambda c: c.num_hidden_layers,
    "hidden_size": lambda c: c.hidden_size,
    "ffn_hidden_size": lambda c: c.intermediate_size,
    "num_attention_heads": lambda c: c.num_attention_heads,
    "num_query_groups": lambda c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
    "kv_channels": _head_dim,
    "layernorm_epsilon": lambda c: c.rms_norm_eps,
    "init_method_std": lambda c: getattr(c, "initializer_range", 0.02),
    "attention_dropout": lambda c: float(getattr(c, "attention_dropout", 0.0) or 0.0),
    "add_qkv_bias": lambda c: _qkv_bias(c),
}

# Fixed by the families we support (checked against the HF config in validate_hf_config).
FIXED_TRANSFORMER_CONFIG: dict[str, Any] = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "activation_func": F.silu,
    "add_bias_linear": False,
    "hidden_dropout": 0.0,
    "persist_layer_norm": False,
    "attention_softmax_in_fp32": True,
}

FUSIONS = ("apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion")
"""TransformerConfig fusion flags, all on with the TE spec (the unfused THD RoPE syncs the host per layer,
megatron/core/models/common/embeddings/rope_utils.py) and all off on the local spec."""


def features_kwargs(feats: features.Features) -> dict[str, Any]:
    """The TransformerConfig fields the implementation decision sets."""
    return {**dict.fromkeys(FUSIONS, feats.fusions), "sequence_parallel": feats.sequence_parallel,
            "gradient_accumulation_fusion": feats.gradient_accumulation_fusion}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _qkv_bias(cfg: Any) -> bool:
    family = QKV_BIAS_BY_FAMILY[cfg.model_type]
    return bool(getattr(cfg, "attention_bias", False)) if family is None else family


def validate_hf_config(cfg: Any, parallel: platform.ParallelConfig) -> None:
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"unsupported Hugging Face config: {field}={getattr(cfg, field, None)!r}: {why}")

    if getattr(cfg, "model_type", None) not in QKV_BIAS_BY_FAMILY:
        raise bad("model_type", f"supported families are {sorted(QKV_BIAS_BY_FAMILY)}")
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        value = getattr(cfg, field, None)
        if not isinstance(value, int) or value <= 0:
            raise bad(field, "must be a positive integer")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise bad("hidden_act", "only SwiGLU (silu) MLPs are supported")
    if getattr(cfg, "mlp_bias", False):
        raise bad("mlp_bias", "MLP biases are not supported")
    if getattr(cfg, "use_sliding_window", False):
        raise bad("use_sliding_window", "sliding-window attention is not supported")
    rope = _rope(cfg)
    if rope["rope_type"] not in ("default", "llama3"):
        raise bad("rope_scaling", f"rope_type {rope['rope_type']!r} is not supported (default, llama3)")
    if rope["rope_type"] == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in expected.items():
            if float(rope.get(key, want)) != want:
                raise bad("rope_scaling", f"llama3 {key} must be {want} (megatron-core's fixed value)")
    heads, groups = cfg.num_attention_heads, HF_TO_TRANSFORMER_CONFIG["num_query_groups"](cfg)
    if heads % groups:
        raise bad("num_key_value_heads", f"must divide num_attention_heads={heads}")
    tp = parallel.tensor_model_parallel_size
    for field, value in (("num_attention_heads", heads), ("num_key_value_heads", groups),
                         ("vocab_size", cfg.vocab_size), ("intermediate_size", cfg.intermediate_size)):
        if value % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size={tp} does not divide the model's {field}={value}"
            )
    if cfg.num_hidden_layers % parallel.pipeline_model_parallel_size:
        raise ValueError(
            f"parallel.pipeline_model_parallel_size={parallel.pipeline_model_parallel_size} does not divide "
            f"the model's num_hidden_layers={cfg.num_hidden_layers}"
        )


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to build and how."""

    hf_path: str = ""
    """Directory of a Hugging Face checkpoint (config.json, weights, tokenizer). Its weights initialise the policy."""
    dtype: str = "float32"
    """Parameter dtype: float32 (CPU, tests), bfloat16 (GPU training)."""
    recompute_activations: bool = False
    """Full activation recompute of every layer (trades ~30% compute for activation memory)."""
    transformer_impl: str = "auto"
    """auto (Transformer Engine on CUDA, which must then import; local without CUDA), te, or local
    (megatron's local spec on a GPU too: no fusions, dense masks). See megatron/features.py."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.transformer_impl not in features.IMPLS:
            raise ValueError(f"model.transformer_impl must be one of {features.IMPLS}, got {self.transformer_impl!r}")


def transformer_config_from_hf(
    hf_config: Any, parallel: platform.ParallelConfig, dtype: str = "float32", recompute: bool = False,
    feats: features.Features | None = None,
) -> Any:
    """The megatron-core TransformerConfig equivalent to ``hf_config`` under ``parallel`` (``feats``: the
    implementation decision; None: this machine's ``auto``)."""
    from megatron.core.transformer import TransformerConfig

    validate_hf_config(hf_config, parallel)
    torch_dtype = DTYPES[dtype]
    kwargs = {name: read(hf_config) for name, read in HF_TO_TRANSFORMER_CONFIG.items()}
    kwargs.update(FIXED_TRANSFORMER_CONFIG)
    kwargs.update(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=torch_dtype is torch.bfloat16,
        fp16=torch_dtype is torch.float16,
        use_cpu_initialization=not platform.cuda_available(),
        variable_seq_lengths=True,  # packed micro-batches differ in length (PP sends the shapes)
        moe_token_dispatcher_type="alltoall",  # the only dispatcher megatron accepts with variable lengths
        **features_kwargs(feats or features.detect("auto", parallel.tensor_model_parallel_size)),
        # Our losses are already normalised over the global batch: no per-micro-batch or per-DP division.
        calculate_per_token_loss=True,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def layer_spec(feats: features.Features, config: Any) -> Any:
    """The TE layer spec, or megatron-core's local one with its norms made sequence-parallel capable
    (megatron/norms.py) and the block's final norm likewise (as the block would build this stage's layers)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if feats.transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = norms.replace_local_norms(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=norms.SequenceParallelRMSNorm)


def features_of(chunk: Any) -> features.Features:
    """The decision a model chunk was built with (DDP / Float16Module wrappers unwrapped)."""
    while not hasattr(chunk, "trapo_features"):
        chunk = chunk.module
    return chunk.trapo_features


def build_model(
    hf_config: Any, parallel: platform.ParallelConfig, dtype: str = "float32", recompute: bool = False,
    transformer_impl: str = "auto",
) -> list[Any]:
    """Model chunks of this rank's pipeline stage (one chunk: no virtual pipeline), on this rank's device.

    Requires :func:`platform.initialize` with the same ``parallel``. ``transformer_impl``: see
    megatron/features.py; the decision is kept on the model (:func:`features_of`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    feats = features.detect(transformer_impl, parallel.tensor_model_parallel_size)
    config = transformer_config_from_hf(hf_config, parallel, dtype, recompute, feats)
    rope = _rope(hf_config)
    with platform.cuda_literals_on_cpu():  # tied embeddings on the last PP stage call .cuda()
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(feats, config),
            vocab_size=hf_config.vocab_size,
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=int(rope.get("rope_theta", 10000)),
            rope_scaling=rope["rope_type"] == "llama3",
            rope_scaling_factor=float(rope.get("factor", 8.0)),
        )
    model.trapo_features = feats
    return [model.to(platform.device())]
