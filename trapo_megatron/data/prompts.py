"""Prompt building: the paper's instruction through the tokenizer's chat template, or plain text.

Paper prompt (Qwen chat template): system "You are a helpful assistant.", user = problem +
"\\nPlease reason step by step, and put your final answer within \\\\boxed{}.", then the assistant header.
"plain" is for tokenizers without a chat template (the shipped toy task): problem + instruction as is.
"raw" is the official code's hard-coded string (Su-my/TRAPO verl/trapo_src/rl_dataset_with_target.py:105-108),
the problem put in place of ``{problem}``, tokenized without added special tokens (:181, :220): it does not
depend on the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PAPER_SYSTEM = "You are a helpful assistant."
PAPER_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
OFFICIAL_RAW_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{problem}\nPlease reason "
    "step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
)

SIMPLERL_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{problem}\nPlease reason "
    "step by step, and put your final answer within\\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n"
)
"""The official eval's "simplerl" prompt (eval_scripts/generate_vllm.py:76-81), a raw_template; as there, no
space before \\boxed and doubled braces (it is not a format string there)."""


@dataclass(kw_only=True)
class PromptConfig:
    """How a problem becomes prompt tokens."""

    template: Literal["chat", "plain", "raw"] = "chat"
    """"chat": the tokenizer's chat template (system + user + generation prompt); "plain": the text as is;
    "raw": raw_template with the problem in place of {problem} (system and instruction unused; the official
    code's hard-coded string, verl/trapo_src/rl_dataset_with_target.py:105-108)."""
    system: str = PAPER_SYSTEM
    """System message in "chat" mode ("" leaves the system turn out)."""
    instruction: str = PAPER_INSTRUCTION
    """Appended to the problem in "chat" and "plain" modes; may be ""."""
    raw_template: str = OFFICIAL_RAW_TEMPLATE
    """The whole prompt text in "raw" mode, with one {problem} (the official code's string by default)."""

    def __post_init__(self) -> None:
        if self.template not in ("chat", "plain", "raw"):
            raise ValueError(f"prompt.template must be 'chat', 'plain' or 'raw', got {self.template!r}")
        if self.template == "raw" and self.raw_template.count("{problem}") != 1:
            raise ValueError("prompt.raw_template must hold exactly one {problem}")


def prompt_text(problem: str, cfg: PromptConfig, tokenizer) -> str:
    """The prompt as text (what the model sees before its answer)."""
    if cfg.template == "raw":
        return cfg.raw_template.replace("{problem}", problem)
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
    """Prompt token ids. The chat template and the raw string carry their own special tokens; plain text gets
    the tokenizer's."""
    text = prompt_text(problem, cfg, tokenizer)
    return list(tokenizer(text, add_special_tokens=cfg.template == "plain")["input_ids"])
