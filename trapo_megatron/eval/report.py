"""Scores per benchmark (avg@k, pass@j) as a table and a JSON report.

The "average" row is the unweighted mean over benchmarks (how the paper's Five-Math average is formed),
not over problems.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from trapo_megatron.eval.benchmarks import Item
from trapo_megatron.eval.metrics import avg_at_k, mean_pass_at_k, reported_ks

Grader = Callable[[list[str], list[str]], list[float]]
"""(responses, golds) -> 0/1 scores, e.g. ``MathRewardPool.score``."""


@dataclass(frozen=True)
class BenchmarkScore:
    benchmark: str
    num_problems: int
    k: int
    """Samples per problem."""
    avg_at_k: float
    """Mean over problems of the fraction of correct samples."""
    pass_at: dict[int, float]
    """j -> mean over problems of the unbiased pass@j."""


def grade_all(items: Sequence[Item], responses: dict[tuple[str, str], list[str]], grader: Grader,
              ) -> dict[tuple[str, str], list[float]]:
    """Scores for every item's responses in one grader call (the pool spreads them over its workers)."""
    flat_r, flat_g, owners = [], [], []
    for it in items:
        key = (it.benchmark, it.id)
        if key not in responses:
            raise ValueError(f"no responses for benchmark {it.benchmark!r} item {it.id!r}")
        for r in responses[key]:
            flat_r.append(r)
            flat_g.append(it.gold)
            owners.append(key)
    scores = grader(flat_r, flat_g) if flat_r else []
    out: dict[tuple[str, str], list[float]] = {(it.benchmark, it.id): [] for it in items}
    for key, s in zip(owners, scores):
        out[key].append(float(s))
    return out


def summarize(items: Sequence[Item], scores: dict[tuple[str, str], list[float]]) -> list[BenchmarkScore]:
    """One BenchmarkScore per benchmark, in first-seen order; every problem must have the same k."""
    by_bench: dict[str, list[list[float]]] = {}
    for it in items:
        by_bench.setdefault(it.benchmark, []).append(scores[(it.benchmark, it.id)])
    out = []
    for name, rows in by_bench.items():
        ks = {len(r) for r in rows}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(
                f"benchmark {name!r}: every problem needs the same number of responses, got {sorted(ks)}"
            )
        k = ks.pop()
        out.append(BenchmarkScore(benchmark=name, num_problems=len(rows), k=k, avg_at_k=avg_at_k(rows),
                                  pass_at={j: mean_pass_at_k(rows, j) for j in reported_ks(k)}))
    return out


def format_table(results: Sequence[BenchmarkScore]) -> str:
    """Percentages, one row per benchmark and an unweighted average row."""
    if not results:
        return "(no benchmarks)"
    ks = sorted({j for r in results for j in r.pass_at})
    head = ["benchmark", "problems", "k", "avg@k"] + [f"pass@{j}" for j in ks]
    rows = [[r.benchmark, str(r.num_problems), str(r.k), f"{100 * r.avg_at_k:.1f}"]
            + [f"{100 * r.pass_at[j]:.1f}" if j in r.pass_at else "-" for j in ks] for r in results]
    if len(results) > 1:
        avg = average(results)
        rows.append(["average", str(sum(r.num_problems for r in results)), "", f"{100 * avg['avg_at_k']:.1f}"]
                    + [f"{100 * avg['pass_at'][j]:.1f}" if j in avg["pass_at"] else "-" for j in ks])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)


def average(results: Sequence[BenchmarkScore]) -> dict:
    """Unweighted mean over benchmarks of avg@k and of each pass@j every benchmark reports."""
    common = set.intersection(*(set(r.pass_at) for r in results))
    return {
        "avg_at_k": sum(r.avg_at_k for r in results) / len(results),
        "pass_at": {j: sum(r.pass_at[j] for r in results) / len(results) for j in sorted(common)},
    }


def write_report(path: str | Path, results: Sequence[BenchmarkScore], scores: dict | None = None,
                 meta: dict | None = None) -> None:
    """JSON: per-benchmark scores, their average, the run's settings and (optionally) every sample's score."""
    data = {
        "benchmarks": [asdict(r) for r in results],
        "average": average(results) if results else None,
        "meta": meta or {},
    }
    if scores is not None:
        data["samples"] = [{"benchmark": b, "id": i, "scores": s} for (b, i), s in scores.items()]
    Path(path).write_text(json.dumps(data, indent=2))


def read_responses(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """A responses file: JSON lines ``{"benchmark": ..., "id": ..., "responses": [...]}``."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"benchmark", "id", "responses"} - set(row)
        if missing:
            raise ValueError(f"{path} line {n + 1}: missing fields {sorted(missing)}")
        out[(str(row["benchmark"]), str(row["id"]))] = list(row["responses"])
    return out


def write_responses(path: str | Path, responses: dict[tuple[str, str], list[str]]) -> None:
    rows = (json.dumps({"benchmark": b, "id": i, "responses": rs}) + "\n" for (b, i), rs in responses.items())
    Path(path).write_text("".join(rows))
