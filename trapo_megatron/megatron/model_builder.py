"""Hugging Face config (Qwen2 / Qwen2.5, Qwen3, Llama 3) -> megatron-core GPTModel.

The config is read once into a :class:`model_spec.ModelSpec` (families, defaults and refusals live there);
the translation is a table of (Megatron field, how to read it from the spec). Which layer spec (Transformer
Engine or megatron's local one), which fusions and whether sequence parallelism runs is one decision
(``features``, ``model.transformer_impl``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trapo_megatron import model_spec
from trapo_megatron.megatron import features, norms, platform

# Megatron TransformerConfig field -> reader of the model spec.
SPEC_TO_TRANSFORMER_CONFIG: dict[str, Callable[[model_spec.ModelSpec], Any]] = {
    "num_layers": lambda m: m.num_layers,
    "hidden_size": lambda m: m.hidden_size,
    "ffn_hidden_size": lambda m: m.ffn_hidden_size,
    "num_attention_heads": lambda m: m.num_attention_heads,
    "num_query_groups": lambda m: m.num_query_groups,
    "kv_channels": lambda m: m.head_dim,
    "layernorm_epsilon": lambda m: m.norm_eps,
    "init_method_std": lambda m: m.init_std,
    "attention_dropout": lambda m: m.attention_dropout,
    "add_qkv_bias": lambda m: m.qkv_bias,
    "qk_layernorm": lambda m: m.qk_layernorm,
    "activation_func": lambda m: ACTIVATIONS[m.activation],
}

ACTIVATIONS: dict[str, Callable[..., Any]] = {"silu": F.silu}
"""model_spec.ACTIVATIONS -> the torch function (gated: SwiGLU)."""

# Fixed by the families we support (model_spec refuses configs that differ).
FIXED_TRANSFORMER_CONFIG: dict[str, Any] = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
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


def validate_hf_config(hf_config: Any, parallel: platform.ParallelConfig) -> model_spec.ModelSpec:
    """The model's spec; ValueError naming the HF field or the parallel knob when it cannot be built."""
    spec = model_spec.from_hf_config(hf_config)
    model_spec.check_parallel(spec, parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                              *parallel.pipeline_split)
    return spec


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

    spec = validate_hf_config(hf_config, parallel)
    torch_dtype = DTYPES[dtype]
    kwargs = {name: read(spec) for name, read in SPEC_TO_TRANSFORMER_CONFIG.items()}
    kwargs.update(FIXED_TRANSFORMER_CONFIG)
    kwargs.update(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
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


def layer_spec(feats: features.Features, config: Any, qk_layernorm: bool = False) -> Any:
    """The TE layer spec, or megatron-core's local one with its norms made sequence-parallel capable
    (megatron/norms.py) and the block's final norm likewise (as the block would build this stage's layers).
    ``qk_layernorm``: Qwen3's per-head RMSNorm on queries and keys (``self_attention.q_layernorm`` /
    ``k_layernorm``; their grads are summed over TP by name in finalize_model_grads)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if feats.transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    layer = norms.replace_local_norms(
        gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm))
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
    spec = model_spec.from_hf_config(hf_config)
    with platform.cuda_literals_on_cpu():  # tied embeddings on the last PP stage call .cuda()
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(feats, config, spec.qk_layernorm),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope.theta),
            rope_scaling=spec.rope.scaling == "llama3",
            rope_scaling_factor=spec.rope.factor,
        )
    model.trapo_features = feats
    return [model.to(platform.device())]
