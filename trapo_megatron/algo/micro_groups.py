"""The micro-group schedule: which micro-group of a prompt gets how much of the expert solution.

A group of G rollouts per prompt is drawn in micro-groups i = 1..K of sizes n_i. Micro-group 1 explores on
its own; micro-group i > 1 is *guided* (conditioned on the first L_i of the expert solution) only when the
prompt's earlier micro-groups did badly. Two rules are supported, as named modes:

- ``paper`` (TRAPO, arXiv 2512.17636): guided iff mean(returns of all earlier samples) < t_i,
  with n = (4, 2, 1, 1), L = (0, 0.2, 0.5, 1.0), t = (-1, 0.5, 0.7, 0.9).
- ``official`` (the authors' code, Su-my/TRAPO): guided iff count(correct earlier samples) < t_i with
  t = (-, 2, 4, 7) (i.e. < 2 of 4, < 4 of 6, < 7 of 7), L = (0, 0.25, 0.5, 1.0), the cut snapped forward to
  a paragraph break within +0.3 |y*|, and the last micro-group guided by a second expert solution when the
  row has one.

Earlier samples include guided ones (both rules do so). A guided micro-group at L = 1.0 is not generated: its
samples are the expert trace + EOS. When several samples of a micro-group share one prefix, exactly one of
them carries the SFT loss on it (the official code's ``off_seq_loss_mask`` = [0, 1] for its pair), so the
prefix is not counted twice. Pure python: no torch, megatron or vllm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["paper", "official"]
Rounding = Literal["ceil", "floor"]

# Per-mode defaults, as data. thresholds are means in "paper" mode and correct counts in "official" mode;
# thresholds[0] is never read (micro-group 1 is never guided).
MODE_DEFAULTS: dict[str, dict] = {
    "paper": dict(
        sizes=(4, 2, 1, 1),
        ratios=(0.0, 0.2, 0.5, 1.0),
        thresholds=(-1.0, 0.5, 0.7, 0.9),
        rounding="ceil",
        snap_window=0.0,
        second_solution_last=False,
        eos_in_length=False,
    ),
    "official": dict(
        sizes=(4, 2, 1, 1),
        ratios=(0.0, 0.25, 0.5, 1.0),
        thresholds=(-1, 2, 4, 7),
        rounding="floor",
        snap_window=0.3,
        second_solution_last=True,
        eos_in_length=True,
    ),
}


@dataclass(kw_only=True)
class MicroGroupConfig:
    """The schedule. Fields left as None take the defaults of ``mode`` (``MODE_DEFAULTS``)."""

    mode: Mode = "paper"
    """"paper": guided iff mean of earlier returns < t_i. "official": guided iff count of correct < t_i."""
    sizes: tuple[int, ...] | None = None
    """n_i, samples per micro-group; their sum is the group size G."""
    ratios: tuple[float, ...] | None = None
    """L_i, fraction of the expert solution given as prefix when micro-group i is guided; ratios[0] is 0."""
    thresholds: tuple[float, ...] | None = None
    """t_i: a mean return (paper) or a count of correct samples (official); thresholds[0] is unused."""
    rounding: Rounding | None = None
    """How L * |y*| becomes a token count: "ceil" (paper's y*_{<=ceil(L|y*|)}) or "floor" (official int())."""
    snap_window: float | None = None
    """Move the cut to just after the first paragraph-break token within +snap_window*|y*|; 0 = off."""
    second_solution_last: bool | None = None
    """Guide the last micro-group with the row's second expert solution when it has one."""
    eos_in_length: bool | None = None
    """Count the appended EOS in |y*| when cutting (the official code cuts solution + EOS)."""
    reward_threshold: float = 0.5
    """A sample counts as correct (official mode) when its reward is >= this."""

    def __post_init__(self) -> None:
        if self.mode not in MODE_DEFAULTS:
            raise ValueError(f"micro_groups.mode must be one of {sorted(MODE_DEFAULTS)}, got {self.mode!r}")
        for name, value in MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.sizes = tuple(int(s) for s in self.sizes)
        self.ratios = tuple(float(r) for r in self.ratios)
        self.thresholds = tuple(self.thresholds)
        k = len(self.sizes)
        if k == 0:
            raise ValueError("micro_groups.sizes must name at least one micro-group")
        for name in ("ratios", "thresholds"):
            if len(getattr(self, name)) != k:
                raise ValueError(
                    f"micro_groups.{name} has {len(getattr(self, name))} entries, sizes has {k}: give one "
                    "per "
                    "micro-group"
                )
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"micro_groups.sizes must all be >= 1, got {self.sizes}")
        if self.ratios[0] != 0.0:
            raise ValueError(
                f"micro_groups.ratios[0] must be 0 (micro-group 1 explores alone), got {self.ratios[0]}"
            )
        if any(not 0.0 < r <= 1.0 for r in self.ratios[1:]):
            raise ValueError(f"micro_groups.ratios[1:] must lie in (0, 1], got {self.ratios[1:]}")
        if self.rounding not in ("ceil", "floor"):
            raise ValueError(f"micro_groups.rounding must be 'ceil' or 'floor', got {self.rounding!r}")
        if self.snap_window < 0:
            raise ValueError(f"micro_groups.snap_window must be >= 0, got {self.snap_window}")

    @property
    def group_size(self) -> int:
        """G, the number of samples per prompt."""
        return sum(self.sizes)

    @property
    def num_micro_groups(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class MicroGroupDecision:
    """What micro-group ``index`` (0-based) of one prompt does.

    Example (paper mode, MG1 returned [0, 0, 1, 0], mean 0.25 < 0.5):
        decide(cfg, 1, [0, 0, 1, 0]) == MicroGroupDecision(index=1, size=2, guided=True, ratio=0.2,
            full_expert=False, use_second_solution=False, sft_sample=1)
    """

    index: int
    size: int
    guided: bool
    ratio: float
    """The prefix ratio L actually used (0.0 when not guided)."""
    full_expert: bool
    """L == 1.0: the samples are the expert trace + EOS and are not generated."""
    use_second_solution: bool
    """Guide with the row's second expert solution (only set when the row has one)."""
    sft_sample: int | None
    """Index within the micro-group of the one sample whose prefix carries SFT loss; None if unguided."""

    @property
    def level(self) -> int:
        """The official code's hint level: the micro-group index when guided, 0 otherwise."""
        return self.index if self.guided else 0


def is_guided(cfg: MicroGroupConfig, index: int, earlier_rewards: Sequence[float]) -> bool:
    """The rule of ``cfg.mode`` for micro-group ``index`` given the rewards of all earlier samples."""
    if index == 0:
        return False
    expected = sum(cfg.sizes[:index])
    if len(earlier_rewards) != expected:
        raise ValueError(
            f"micro-group {index} needs the {expected} earlier rewards, got {len(earlier_rewards)}"
        )
    if cfg.mode == "paper":
        return sum(earlier_rewards) / len(earlier_rewards) < cfg.thresholds[index]
    num_correct = sum(1 for r in earlier_rewards if r >= cfg.reward_threshold)
    return num_correct < cfg.thresholds[index]


def decide(
    cfg: MicroGroupConfig, index: int, earlier_rewards: Sequence[float], *, has_second_solution: bool = False
) -> MicroGroupDecision:
    """Decide micro-group ``index`` of one prompt from the rewards of its earlier samples (in order)."""
    guided = is_guided(cfg, index, earlier_rewards)
    ratio = cfg.ratios[index] if guided else 0.0
    last = index == cfg.num_micro_groups - 1
    return MicroGroupDecision(
        index=index,
        size=cfg.sizes[index],
        guided=guided,
        ratio=ratio,
        full_expert=guided and ratio >= 1.0,
        use_second_solution=guided and last and bool(cfg.second_solution_last) and has_second_solution,
        sft_sample=cfg.sizes[index] - 1 if guided else None,
    )


def cut_length(num_tokens: int, ratio: float, rounding: Rounding) -> int:
    """Tokens in the prefix y*_{<=L|y*|} before any paragraph snapping."""
    raw = ratio * num_tokens
    return min(num_tokens, math.ceil(raw - 1e-9) if rounding == "ceil" else int(raw))
