"""avg@k and pass@k over k graded samples per problem.

Both are means over PROBLEMS (each problem weighs the same, whatever its benchmark size).
- avg@k: per problem, the fraction of its k samples that are correct; then the mean over problems.
  It is the unbiased estimate of pass@1 from k samples.
- pass@j (j <= n): per problem with n samples of which c are correct, the unbiased estimator of
  Chen et al. 2021 (Codex, eq. 1): 1 - C(n - c, j) / C(n, j), the chance that j samples drawn without
  replacement from the n contain a correct one; then the mean over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: correct count c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must lie in [1, n={n}]")
    return 1.0 - comb(n - c, k) / comb(n, k)


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean score of each problem's samples (scores are 0/1 rewards)."""
    if not scores:
        raise ValueError("avg_at_k: no problems")
    return sum(sum(s) / len(s) for s in scores) / len(scores)


def mean_pass_at_k(scores: Sequence[Sequence[float]], k: int) -> float:
    """Mean over problems of :func:`pass_at_k`; a sample counts as correct when its score is >= 0.5."""
    if not scores:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(len(s), sum(x >= 0.5 for x in s), k) for s in scores) / len(scores)


def reported_ks(n: int) -> list[int]:
    """The pass@k columns worth reporting for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return ks
