"""Helpers of the vLLM CPU-build tests: the demo model untied, and log-probs recomputed by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trapo_megatron.commands.demo import ASSETS


def untied_demo_model(directory: Path) -> Path:
    """The demo model with its head untied: a copy of the embedding plus noise, so a head left stale (or fed
    the embedding) by a refit shows in the log-probs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = ASSETS / "model"
    shutil.copytree(src, directory)
    config = AutoConfig.from_pretrained(src, tie_word_embeddings=False)
    tied = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed + 0.05 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    model.load_state_dict(state)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory)
    assert not model.config.tie_word_embeddings
    return directory


def sequence_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt, tokens[:i]) under the transformers model at temperature 1."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return rows.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
