"""Cut the expert prefix y*_{<=L|y*|} at token level.

The cut works on token ids, never on text, so the prefix the policy is conditioned on and the prefix the
trainer puts SFT loss on are the same tokens, and the continuation starts exactly after them.

- Paper mode: k = ceil(L * |y*|) tokens of the solution.
- Official mode (Su-my/TRAPO ``get_prefix_end_idx``): |y*| counts the appended EOS, k = int(L * |y*|), then
  the cut moves to just after the first paragraph-break token at an index > k, if that token lies below
  (L + 0.3) * |y*|.
- L = 1.0: the whole solution + EOS (the sample is the expert trace; nothing is generated).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trapo_megatron.algo.micro_groups import MicroGroupConfig, cut_length

# Byte-level BPE writes "\n" as "Ċ" (GPT-2 / Qwen vocabularies); plain vocabularies keep "\n".
_PARAGRAPH_MARKS = ("\n\n", "ĊĊ")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def think_text(solution: str) -> str:
    """The official expert text (trapo_src/rl_dataset_with_target.py): the stripped text inside the first
    <think>...</think>; without a closed pair, the whole stripped solution."""
    m = _THINK_RE.search(solution)
    return m.group(1).strip() if m else solution.strip()


def paragraph_token_ids(tokenizer) -> frozenset[int]:
    """Ids of vocabulary tokens that contain a paragraph break ("\\n\\n")."""
    vocab = tokenizer.get_vocab()
    ids = {i for tok, i in vocab.items() if any(m in tok for m in _PARAGRAPH_MARKS)}
    return frozenset(ids)


def cut_index(
    num_tokens: int,
    ratio: float,
    *,
    rounding: str,
    snap_window: float = 0.0,
    paragraph_positions: Sequence[int] = (),
) -> int:
    """Number of tokens in the prefix of a ``num_tokens``-long expert sequence.

    ``paragraph_positions`` are the (ascending) indices of paragraph-break tokens in that sequence.
    Example: 20 tokens, L=0.25 (floor -> 5), a break at index 7, window 0.3 (7 < 0.55*20) -> 8.
    """
    k = cut_length(num_tokens, ratio, rounding)  # type: ignore[arg-type]
    if snap_window > 0:
        limit = num_tokens * (ratio + snap_window)
        nxt = next((p for p in paragraph_positions if p > k), None)
        if nxt is not None and nxt < limit:
            return nxt + 1
    return k


def cut_prefix(
    solution_ids: Sequence[int],
    ratio: float,
    cfg: MicroGroupConfig,
    *,
    eos_id: int,
    paragraph_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """The expert prefix (token ids) for prefix ratio ``ratio`` under the schedule ``cfg``.

    Example (paper mode, 10 solution tokens, L=0.2): the first ceil(2.0) = 2 tokens. L=1.0: all 10 + [eos_id].
    """
    if ratio <= 0:
        return []
    hint = list(solution_ids) + [eos_id]
    if ratio >= 1.0:
        return hint
    n = len(hint) if cfg.eos_in_length else len(solution_ids)
    positions = [i for i, t in enumerate(hint[:n]) if t in paragraph_ids] if cfg.snap_window else []
    k = cut_index(n, ratio, rounding=cfg.rounding, snap_window=cfg.snap_window, paragraph_positions=positions)
    return hint[: min(k, len(solution_ids))]
