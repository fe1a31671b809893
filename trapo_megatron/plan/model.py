"""Model shapes the planner needs, and exact per-rank parameter counts in Megatron-Core's layout.

Plain python: no torch, megatron or nemo_run import, so `trapo plan` answers in milliseconds on a laptop.
The counts follow Megatron's GPT layout (what the builder makes from a Hugging Face Qwen2/Llama config):
per layer an RMSNorm before attention and before the MLP, a fused QKV projection (grouped-query attention,
optional bias), the attention output projection, a gated (SwiGLU) or plain fc1 and fc2; word embeddings on
the first pipeline stage, the final norm and the output layer on the last one. Our builder does not pad the
vocabulary (it requires TP to divide it); ``vocab_divisor`` models Megatron-LM's
``make_vocab_size_divisible_by`` padding to a multiple of ``vocab_divisor * TP`` for checkpoints with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True, frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, in Hugging Face terms."""

    name: str
    """A label for tables and reports."""
    num_layers: int
    """Transformer layers (``num_hidden_layers``)."""
    hidden_size: int
    """Model width h."""
    ffn_hidden_size: int
    """MLP width (``intermediate_size``)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (``num_key_value_heads``); equal to the query heads without GQA."""
    vocab_size: int
    """Vocabulary before Megatron pads it."""
    kv_channels: int | None = None
    """Head dimension; ``hidden_size // num_attention_heads`` when None (Qwen3 sets it explicitly)."""
    qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2 has one)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    gated_mlp: bool = True
    """SwiGLU: fc1 holds gate and up projections."""
    tie_embeddings: bool = False
    """Output layer shares the word-embedding weight."""

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "vocab_size"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelSpec.{f} must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"ModelSpec.num_query_groups ({self.num_query_groups}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim


# Published shapes (the models' own config.json). Keys are the preset names `trapo plan --model` takes.
PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(  # the CPU demo's model (trapo_megatron/assets/demo/model)
        name="tiny", num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
        num_query_groups=2, vocab_size=112, qkv_bias=True, tie_embeddings=True,
    ),
    "qwen2.5-math-7b": ModelSpec(
        name="qwen2.5-math-7b", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
        num_attention_heads=28, num_query_groups=4, vocab_size=152064, qkv_bias=True,
    ),
    "qwen2.5-7b": ModelSpec(
        name="qwen2.5-7b", num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
        num_query_groups=4, vocab_size=152064, qkv_bias=True,
    ),
    "llama3.1-8b": ModelSpec(
        name="llama3.1-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256,
    ),
    "qwen2.5-32b": ModelSpec(
        name="qwen2.5-32b", num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40,
        num_query_groups=8, vocab_size=152064, qkv_bias=True,
    ),
    "qwen3-32b": ModelSpec(
        name="qwen3-32b", num_layers=64, hidden_size=5120, ffn_hidden_size=25600, num_attention_heads=64,
        num_query_groups=8, kv_channels=128, vocab_size=151936, qk_layernorm=True,
    ),
    "qwen2.5-72b": ModelSpec(
        name="qwen2.5-72b", num_layers=80, hidden_size=8192, ffn_hidden_size=29568, num_attention_heads=64,
        num_query_groups=8, vocab_size=152064, qkv_bias=True,
    ),
}


def spec_from_hf_config(config: dict | str | Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face ``config.json`` (a dict, the file, or the folder holding it)."""
    if not isinstance(config, dict):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    mt = str(config.get("model_type", ""))
    return ModelSpec(
        name=name or config.get("_name_or_path") or mt or "model",
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        kv_channels=config.get("head_dim"),
        qkv_bias=bool(config.get("attention_bias", mt == "qwen2")),
        qk_layernorm=mt.startswith("qwen3"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def resolve_model(model: str) -> ModelSpec:
    """A preset name, a Hugging Face config.json, or a folder holding one."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.exists():
        return spec_from_hf_config(path, name=path.stem if path.is_file() else path.name)
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
    fc1 = h * f * (2 if spec.gated_mlp else 1)
    fc2 = f * h
    sharded = qkv + proj + fc1 + fc2
    assert sharded % tp == 0 or tp == 1, "TP must divide heads and ffn"
    norms = 2 * h + (2 * spec.head_dim if spec.qk_layernorm else 0)
    return RankParams(tp_sharded=sharded // tp, replicated=norms)


def stage_params(spec: ModelSpec, tp: int, pp: int, stage: int, vocab_divisor: int = 1) -> RankParams:
    """Parameters of pipeline ``stage`` (0-based) on one TP rank; layers split evenly over stages."""
    if spec.num_layers % pp:
        raise ValueError(f"--pp {pp} must divide num_layers {spec.num_layers}")
    layer = layer_params(spec, tp)
    n = spec.num_layers // pp
    sharded, replicated = n * layer.tp_sharded, n * layer.replicated
    embed = padded_vocab(spec, tp, vocab_divisor) * spec.hidden_size // tp
    first, last = stage == 0, stage == pp - 1
    if first:
        sharded += embed
    if last:
        replicated += spec.hidden_size  # final norm
        if not spec.tie_embeddings or not first:
            sharded += embed  # output layer (a shared copy of the embedding when tied and PP > 1)
    return RankParams(tp_sharded=sharded, replicated=replicated)


def total_params(spec: ModelSpec) -> int:
    """Unpadded parameter count of the whole model (what model cards quote)."""
    layer = layer_params(spec, 1).total * spec.num_layers
    embed = spec.vocab_size * spec.hidden_size
    return layer + embed * (1 if spec.tie_embeddings else 2) + spec.hidden_size

