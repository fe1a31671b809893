"""Tiny random Hugging Face models for the conversion and weight-stream tests (built from config, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}

# (family, tied): Qwen2 has QKV bias; Llama has none.
CASES = [("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True)]


def hf_config(family: str, tied: bool, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    return cls(**{**TINY, "tie_word_embeddings": tied, **overrides})


def hf_model(family: str, tied: bool, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tied, **overrides))
    with torch.no_grad():  # norms start at 1.0: perturb them so a swapped norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return directory


def causal_mask(seq: int) -> torch.Tensor:
    """Megatron's explicit mask on CPU: True = masked, shape (1, 1, s, s)."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)


def input_ids(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    """A direct model call at TP > 1 runs with sequence parallelism, which needs seq % TP == 0 (the train
    step pads packed rows itself: data/packing.py pad_row)."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids):
    """Logits (b, s, V) of a Megatron model at any TP: this rank's vocabulary shard gathered over TP."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        local = model[0](ids, pos, causal_mask(ids.shape[1]))  # (b, s, V/TP)
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
