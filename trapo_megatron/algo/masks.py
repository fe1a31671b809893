"""Per-token roles of a TRAPO sample and the shifted loss masks for next-token prediction.

A sample is laid out as ``[prompt][expert prefix][continuation][padding]``: the prompt is never trained on,
the expert prefix (guided samples only, possibly empty) gets the prefix-token objective (TrSFT), the
continuation (the policy's own tokens, possibly empty, e.g. for an L = 1.0 pure-SFT sample) gets the policy
gradient, and padding gets nothing. Worked example, prompt 3, prefix 2, continuation 2, padding 1:

    tokens        p0  p1  p2  e0  e1  c0  c1  PAD
    roles          P   P   P   E   E   C   C   -       (PROMPT, PREFIX, CONTINUATION, PAD)
    labels        p1  p2  e0  e1  c0  c1  PAD  -100    (logits at t predict labels[t] = tokens[t+1])
    sft_mask       0   0   1   1   0   0   0   0       (targets e0, e1; 0 everywhere if the prefix is shared
    rl_mask        0   0   0   0   1   1   0   0        and another sample already carries its SFT loss)

When several samples of one micro-group share a prefix, only one of them carries the SFT loss on it
(:func:`prefix_sft_carriers`), so a shared prefix is counted once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

PROMPT, PREFIX, CONTINUATION, PAD = 0, 1, 2, 3
IGNORE_LABEL = -100
"""Label of positions with no next token (the last one); the vocab-parallel kernels give them logp 0."""


def token_roles(
    prompt_lens: torch.Tensor, prefix_lens: torch.Tensor, continuation_lens: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Roles ``[N, seq_len]`` int8 (PROMPT/PREFIX/CONTINUATION/PAD) from per-sample segment lengths ``[N]``.

    Segments follow each other from position 0; everything after the continuation is PAD. Raises
    ValueError if a sample does not fit in ``seq_len`` or a length is negative.
    """
    lens = torch.stack(
        [torch.as_tensor(x, dtype=torch.long) for x in (prompt_lens, prefix_lens, continuation_lens)]
    )
    if bool((lens < 0).any()):
        raise ValueError("segment lengths must be >= 0")
    ends = lens.cumsum(dim=0)  # [3, N] end of prompt, prefix, continuation
    if bool((ends[2] > seq_len).any()):
        raise ValueError(f"a sample is longer than seq_len={seq_len}")
    pos = torch.arange(seq_len).unsqueeze(0)  # [1, S]
    roles = torch.full((lens.shape[1], seq_len), PAD, dtype=torch.int8)
    roles[pos < ends[2].unsqueeze(1)] = CONTINUATION
    roles[pos < ends[1].unsqueeze(1)] = PREFIX
    roles[pos < ends[0].unsqueeze(1)] = PROMPT
    return roles


def loss_masks(
    roles: torch.Tensor, prefix_carries_sft: torch.Tensor | bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted ``(sft_mask, rl_mask)``, both bool and shaped like ``roles`` ``[..., S]``.

    Position t is a loss position when its TARGET (token t+1) is a prefix token (sft_mask, and only for
    samples whose ``prefix_carries_sft`` [...] is true) or a continuation token (rl_mask). The last position
    has no target and is never a loss position.
    """
    target = torch.full_like(roles, PAD)
    target[..., :-1] = roles[..., 1:]
    carries = torch.as_tensor(prefix_carries_sft, dtype=torch.bool)
    if carries.dim() > 0:
        carries = carries.unsqueeze(-1)
    return (target == PREFIX) & carries, target == CONTINUATION


def shift_labels(tokens: torch.Tensor, ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """``labels[..., t] = tokens[..., t+1]``; the last position gets ``ignore_label``."""
    labels = torch.full_like(tokens, ignore_label)
    labels[..., :-1] = tokens[..., 1:]
    return labels


def prefix_sft_carriers(prefix_keys: Sequence[Hashable | None]) -> list[bool]:
    """Which samples carry the SFT loss on their prefix: the first sample of each distinct key.

    ``prefix_keys[i]`` identifies the prefix sample i was conditioned on (e.g. ``(prompt_id, micro_group)``)
    or is ``None`` for an unguided sample (which has no prefix; it returns False). Example:
    ``[None, ("q0", 2), ("q0", 2), ("q1", 3)] -> [False, True, False, True]``.
    """
    seen: set[Hashable] = set()
    out = []
    for key in prefix_keys:
        out.append(key is not None and key not in seen)
        if key is not None:
            seen.add(key)
    return out
