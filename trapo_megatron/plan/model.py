"""Model presets for the planner, and exact per-rank parameter counts in Megatron-Core's layout.

Plain python: no torch, megatron or nemo_run import, so `trapo plan` answers in milliseconds on a laptop.
The counts follow Megatron's GPT layout (what the builder makes from the same :class:`ModelSpec`):
per layer an RMSNorm before attention and before the MLP, a fused QKV projection (grouped-query attention,
optional bias, optional per-head Q/K RMSNorm), the attention output projection, a SwiGLU fc1 and fc2; word
embeddings on the first pipeline stage, the final norm and the output layer on the last one. Our builder does not pad the
vocabulary (it requires TP to divide it); ``vocab_divisor`` models Megatron-LM's
``make_vocab_size_divisible_by`` padding to a multiple of ``vocab_divisor * TP`` for checkpoints with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from trapo_megatron import model_spec
from trapo_megatron.model_spec import ModelSpec

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "demo" / "model" / "config.json"

# Published shapes: the fields of the models' own config.json that differ from their family's defaults.
# Keys are the preset names `trapo plan --model` takes; "tiny" is the CPU demo's model itself.
PRESET_CONFIGS: dict[str, dict] = {
    "qwen2.5-math-7b": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
                        "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "qwen2.5-7b": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "rope_theta": 1000000.0},
    "llama3.1-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen3-8b": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "intermediate_size": 12288,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0},
    "qwen2.5-32b": {"model_type": "qwen2", "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 27648,
                    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5},
    "qwen3-32b": {"model_type": "qwen3", "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 25600,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "max_position_embeddings": 40960, "rope_theta": 1000000.0},
    "qwen2.5-72b": {"model_type": "qwen2", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 29568,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5},
}

PRESETS: dict[str, ModelSpec] = {
    "tiny": model_spec.from_hf_config(DEMO_CONFIG, name="tiny"),
    **{name: model_spec.from_hf_config(cfg, name=name) for name, cfg in PRESET_CONFIGS.items()},
}


def resolve_model(model: str) -> ModelSpec:
    """A preset name, a Hugging Face config.json, or a folder holding one."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.exists():
        return model_spec.from_hf_config(path, name=path.stem if path.is_file() else path.name)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")


def padded_vocab(spec: ModelSpec, tp: int, vocab_divisor: int = 1) -> int:
    """The vocabulary padded to a multiple of ``vocab_divisor * TP`` (1: none beyond TP, as our builder)."""
    multiple = vocab_divisor * tp
    return math.ceil(spec.vocab_size / multiple) * multiple


@dataclass(kw_only=True, frozen=True)
class RankParams:
    """Parameter counts held by one rank of a pipeline stage."""

    tp_sharded: int
    """Elements split across the TP group (this rank's share)."""
    replicated: int
    """Elements every TP rank holds in full (norms)."""

    @property
    def total(self) -> int:
        return self.tp_sharded + self.replicated


def layer_params(spec: ModelSpec, tp: int) -> RankParams:
    """One transformer layer on one TP rank."""
    h, q, kv, f = spec.hidden_size, spec.q_size, spec.kv_size, spec.ffn_hidden_size
    qkv = h * (q + 2 * kv) + (q + 2 * kv if spec.qkv_bias else 0)
    proj = q * h
    fc1 = h * f * 2  # SwiGLU: gate and up
    fc2 = f * h
    sharded = qkv + proj + fc1 + fc2
    assert sharded % tp == 0 or tp == 1, "TP must divide heads and ffn"
    norms = 2 * h + (2 * spec.head_dim if spec.qk_layernorm else 0)
    return RankParams(tp_sharded=sharded // tp, replicated=norms)


def stage_params(spec: ModelSpec, tp: int, pp: int, stage: int, vocab_divisor: int = 1,
                 first: int | None = None, last: int | None = None) -> RankParams:
    """Parameters of pipeline ``stage`` (0-based) on one TP rank; ``first`` / ``last``: layers on the first /
    last stage (None: an even split), as :func:`model_spec.pipeline_stages` places them."""
    layer = layer_params(spec, tp)
    n = model_spec.pipeline_stages(spec.num_layers, pp, first, last)[stage]
    sharded, replicated = n * layer.tp_sharded, n * layer.replicated
    embed = padded_vocab(spec, tp, vocab_divisor) * spec.hidden_size // tp
    is_first, is_last = stage == 0, stage == pp - 1
    if is_first:
        sharded += embed
    if is_last:
        replicated += spec.hidden_size  # final norm
        if not spec.tied_embeddings or not is_first:
            sharded += embed  # output layer (a shared copy of the embedding when tied and PP > 1)
    return RankParams(tp_sharded=sharded, replicated=replicated)


def total_params(spec: ModelSpec) -> int:
    """Unpadded parameter count of the whole model (what model cards quote)."""
    layer = layer_params(spec, 1).total * spec.num_layers
    embed = spec.vocab_size * spec.hidden_size
    return layer + embed * (1 if spec.tied_embeddings else 2) + spec.hidden_size

