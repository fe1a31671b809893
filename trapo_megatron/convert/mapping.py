"""The Hugging Face <-> Megatron name mapping, as data.

A mapping is a list of :class:`Entry`: one Megatron tensor, the Hugging Face tensors it is made of, how they
combine (``formats.Format``) and how the result is split over TP (``distribution.Shard``). Names carry the
layer wildcard ``*``. Qwen2 / Qwen2.5, Qwen3 and Llama 3 share every name; the families differ only in whether
the QKV bias and the QK norms exist and in tied embeddings, all read from the :class:`ModelSpec`. The Transformer Engine layer spec fuses
the two norms into the following linear layer: that is a rename table (``SPEC_RENAMES``), not new entries.

One generic walk, :func:`entries`, expands the table for a model; every converter and the live stream use it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from trapo_megatron.convert.distribution import Shard
from trapo_megatron.convert.formats import Format
from trapo_megatron.model_spec import LM_HEAD, ModelSpec

LAYER = "*"


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the Hugging Face tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    fmt: Format = Format.IDENTITY
    shard: Shard = Shard.REPLICATED

    def at_layer(self, layer: int) -> Entry:
        """The entry with the wildcard replaced by ``layer`` (the same index on both sides)."""
        sub = str(layer)
        return replace(self, mcore=self.mcore.replace(LAYER, sub), hf=tuple(h.replace(LAYER, sub) for h in self.hf))

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore


_ATTN, _MLP, _HF = "decoder.layers.*.self_attention", "decoder.layers.*.mlp", "model.layers.*"

# Entries shared by every supported family (names of the local layer spec).
BASE: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard=Shard.VOCAB),
    Entry("decoder.layers.*.input_layernorm.weight", (f"{_HF}.input_layernorm.weight",)),
    Entry(f"{_ATTN}.linear_qkv.weight", tuple(f"{_HF}.self_attn.{p}_proj.weight" for p in "qkv"),
          Format.QKV, Shard.COLUMN),
    Entry(f"{_ATTN}.linear_proj.weight", (f"{_HF}.self_attn.o_proj.weight",), shard=Shard.ROW),
    Entry("decoder.layers.*.pre_mlp_layernorm.weight", (f"{_HF}.post_attention_layernorm.weight",)),
    Entry(f"{_MLP}.linear_fc1.weight", (f"{_HF}.mlp.gate_proj.weight", f"{_HF}.mlp.up_proj.weight"),
          Format.GATE_UP, Shard.GATED_COLUMN),
    Entry(f"{_MLP}.linear_fc2.weight", (f"{_HF}.mlp.down_proj.weight",), shard=Shard.ROW),
    Entry("decoder.final_layernorm.weight", ("model.norm.weight",)),
)
QK_NORMS = (Entry(f"{_ATTN}.q_layernorm.weight", (f"{_HF}.self_attn.q_norm.weight",)),
            Entry(f"{_ATTN}.k_layernorm.weight", (f"{_HF}.self_attn.k_norm.weight",)))
"""Qwen3's per-head query / key RMSNorm (one head_dim vector, the same on every TP rank)."""
QKV_BIAS = Entry(f"{_ATTN}.linear_qkv.bias", tuple(f"{_HF}.self_attn.{p}_proj.bias" for p in "qkv"),
                 Format.QKV, Shard.COLUMN)
OUTPUT = Entry("output_layer.weight", (LM_HEAD,), shard=Shard.VOCAB)


class Spec(StrEnum):
    """Megatron layer spec: names differ where TE fuses a norm into the next linear layer."""

    LOCAL = "local"
    TE = "te"


SPEC_RENAMES: dict[Spec, dict[str, str]] = {
    Spec.LOCAL: {},
    Spec.TE: {
        "decoder.layers.*.input_layernorm.weight": f"{_ATTN}.linear_qkv.layer_norm_weight",
        "decoder.layers.*.pre_mlp_layernorm.weight": f"{_MLP}.linear_fc1.layer_norm_weight",
    },
}

def entries(dims: ModelSpec, spec: Spec = Spec.LOCAL) -> list[Entry]:
    """The model's mapping table (wildcards kept), in checkpoint order, with the spec's Megatron names."""
    table = list(BASE)
    if dims.qk_layernorm:
        table[4:4] = QK_NORMS
    if dims.qkv_bias:
        table.insert(3, QKV_BIAS)
    if not dims.tied_embeddings:
        table.append(OUTPUT)
    renames = SPEC_RENAMES[spec]
    return [replace(e, mcore=renames.get(e.mcore, e.mcore)) for e in table]


def walk(dims: ModelSpec, spec: Spec = Spec.LOCAL) -> Iterator[tuple[Entry, int | None]]:
    """(wildcard entry, layer or None) in HF order: embedding, each layer's entries, final norm, output."""
    table = entries(dims, spec)
    head = [e for e in table if not e.per_layer and not e.mcore.startswith(("decoder.final", "output"))]
    tail = [e for e in table if not e.per_layer and e not in head]
    yield from ((e, None) for e in head)
    yield from ((e, layer) for layer in range(dims.num_layers) for e in table if e.per_layer)
    yield from ((e, None) for e in tail)


def expanded(dims: ModelSpec, spec: Spec = Spec.LOCAL) -> list[Entry]:
    """Every concrete entry, in :func:`walk` order."""
    return [e if layer is None else e.at_layer(layer) for e, layer in walk(dims, spec)]


@functools.lru_cache(maxsize=8)
def hf_shapes(dims: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes a checkpoint with this config must hold (used to validate inputs)."""
    h, d = dims.hidden_size, dims.head_dim
    q, kv = dims.num_attention_heads * d, dims.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (dims.ffn_hidden_size, h),
        "mlp.up_proj.weight": (dims.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, dims.ffn_hidden_size),
    }
    if dims.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    if dims.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    shapes = {"model.embed_tokens.weight": (dims.vocab_size, h), "model.norm.weight": (h,)}
    if not dims.tied_embeddings:
        shapes[LM_HEAD] = (dims.vocab_size, h)
    for i in range(dims.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def check_hf_tensors(dims: ModelSpec, found: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError listing missing, unexpected and mis-shaped tensors, before anything is written."""
    want = hf_shapes(dims)
    found = {k: v for k, v in found.items() if not dims.is_tied_head(k)}  # some writers keep the tied copy
    missing = sorted(set(want) - set(found))
    extra = sorted(set(found) - set(want))
    wrong = sorted(f"{k}: checkpoint {tuple(found[k])} vs config {want[k]}" for k in set(want) & set(found)
                   if tuple(found[k]) != want[k])
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing: {missing[:6]}" if missing else "",
                 f"{len(extra)} unexpected: {extra[:6]}" if extra else "",
                 f"{len(wrong)} with another shape: {wrong[:6]}" if wrong else ""]
        raise ValueError(
            f"the checkpoint's tensors do not match its config ({dims.model_type}, {dims.num_layers} layers, "
            f"hidden {dims.hidden_size}, {dims.num_attention_heads} heads / {dims.num_query_groups} KV heads, "
            f"vocab {dims.vocab_size}, tied={dims.tied_embeddings}): " + "; ".join(p for p in parts if p)
        )


def mcore_shape(entry: Entry, dims: ModelSpec) -> tuple[int, ...]:
    """The TP=1 Megatron shape of one layer's tensor of ``entry`` (vocab unpadded)."""
    shapes = hf_shapes(dims)
    entry = entry.at_layer(0) if entry.per_layer else entry
    first = shapes[entry.hf[0]]
    if entry.fmt is Format.IDENTITY:
        return first
    return (sum(shapes[h][0] for h in entry.hf), *first[1:])
