"""Prompt building: the paper's instruction through the tokenizer's chat template, or plain text.

Paper prompt (Qwen chat template): system "You are a helpful assistant.", user = problem +
"\\nPlease reason step by step, and put your final answer within \\\\boxed{}.", then the assistant header.
"plain" is for tokenizers without a chat template (the shipped toy task): problem + instruction as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PAPER_SYSTEM = "You are a helpful assistant."
PAPER_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(kw_only=True)
class PromptConfig:
    """How a problem becomes prompt tokens."""

    template: Literal["chat", "plain"] = "chat"
    """"chat": the tokenizer's chat template (system + user + generation prompt); "plain": the text as is."""
    system: str = PAPER_SYSTEM
    """System message in "chat" mode ("" leaves the system turn out)."""
    instruction: str = PAPER_INSTRUCTION
    """Appended to the problem in both modes; may be ""."""

    def __post_init__(self) -> None:
        if self.template not in ("chat", "plain"):
            raise ValueError(f"prompt.template must be 'chat' or 'plain', got {self.template!r}")


def prompt_text(problem: str, cfg: PromptConfig, tokenizer) -> str:
    """The prompt as text (what the model sees before its answer)."""
    user = problem + cfg.instruction
    if cfg.template == "plain":
        return user
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt.template is 'chat' but the tokenizer has no chat_template; use template='plain'"
        )
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(problem: str, cfg: PromptConfig, tokenizer) -> list[int]:
    """Prompt token ids. The chat template carries its own special tokens; plain text gets the tokenizer's."""
    text = prompt_text(problem, cfg, tokenizer)
    return list(tokenizer(text, add_special_tokens=cfg.template == "plain")["input_ids"])
