"""Tiny tokenizer and model builders shared by the data / reward / rollout tests (fast, no network)."""

from __future__ import annotations

import json
import os

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "openr1_tiny.jsonl")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    """Training text for the tokenizer: the fixture rows plus the toy task's alphabet."""
    texts = ["347+285=7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}", "Please reason step by step.\n\n"] * 20
    with open(FIXTURE) as f:
        for line in f:
            row = json.loads(line)
            texts += [row["problem"], str(row["answer"])]
            sol = row["solution"]
            texts += sol if isinstance(sol, list) else [sol]
    return texts


def tiny_tokenizer(chat: bool = True, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in-process, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Paragraph breaks become their own pre-token (as in Qwen's regex), so "\n\n" can be one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2_config(vocab_size: int, tie: bool = True):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
    )
