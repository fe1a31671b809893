"""trapo-megatron: TRAPO post-training (TrSFT on expert prefixes + Dr.GRPO on continuations) on Megatron-Core."""

__version__ = "0.1.0"
