"""Data: OpenR1-Math-style rows -> validated prompts, the prompt template, and token-level prefix cutting."""

from trapo_megatron.data.dataset import (
    BadRowError,
    DataConfig,
    Example,
    LoadStats,
    build_examples,
    load_examples,
)
from trapo_megatron.data.prefix import cut_index, cut_prefix, paragraph_token_ids, think_text
from trapo_megatron.data.prompts import (
    PAPER_INSTRUCTION,
    PAPER_SYSTEM,
    PromptConfig,
    encode_prompt,
    prompt_text,
)

__all__ = [
    "PAPER_INSTRUCTION",
    "PAPER_SYSTEM",
    "BadRowError",
    "DataConfig",
    "Example",
    "LoadStats",
    "PromptConfig",
    "build_examples",
    "cut_index",
    "cut_prefix",
    "encode_prompt",
    "load_examples",
    "paragraph_token_ids",
    "prompt_text",
    "think_text",
]
