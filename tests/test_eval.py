"""`trapo eval`: pass@k against brute force, the five file formats, and the scores of fixed outputs."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest

from trapo_megatron.commands import eval as eval_command
from trapo_megatron.eval.benchmarks import (
    SAMPLE_DIR,
    SAMPLE_FORMATS,
    load_benchmark,
    parse_data_arg,
    sample_benchmarks,
)
from trapo_megatron.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k, reported_ks
from trapo_megatron.eval.report import grade_all, summarize

RESPONSES = SAMPLE_DIR / "responses.jsonl"


CASES = [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)]


@pytest.mark.parametrize("n,c,k", CASES)
def test_pass_at_k_equals_brute_force_over_subsets(n: int, c: int, k: int) -> None:
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_avg_at_k_is_mean_of_problem_means() -> None:
    assert avg_at_k([[1, 0, 0, 0], [1, 1]]) == pytest.approx((0.25 + 1.0) / 2)
    assert mean_pass_at_k([[1, 0, 0, 0], [0, 0, 0, 0]], 4) == pytest.approx(0.5)
    assert reported_ks(8) == [1, 2, 4, 8] and reported_ks(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("bad", [(3, 4, 1), (3, 1, 4), (3, 1, 0)])
def test_pass_at_k_rejects_bad_counts(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*bad)


# gold answers of the shipped sample, as each format stores them
SAMPLE_GOLDS = {
    "math500": ["\\frac{5}{6}", "4", "5\\sqrt{2}"],
    "aime": ["24", "56", "45"],          # ints
    "amc": ["210", "8", "10"],           # floats 210.0 -> "210"
    "minerva": ["60", "3", "3"],         # last \boxed{} of the solution
    "olympiadbench": ["3", "15", "4"],   # ["$3$"] -> "3"
}


@pytest.mark.parametrize("fmt", SAMPLE_FORMATS)
def test_sample_files_load_in_every_format(fmt: str) -> None:
    items = load_benchmark(SAMPLE_DIR / f"{fmt}.jsonl", fmt)
    assert [it.gold for it in items] == SAMPLE_GOLDS[fmt]
    assert all(it.problem and it.benchmark == fmt for it in items)


def test_loader_errors_name_file_row_and_column(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "final_answer": ["2"]}) + "\n")
    with pytest.raises(ValueError, match="row 0.*'problem'"):
        load_benchmark(path, "math500")
    path.write_text(json.dumps({"problem": "1+1?", "solution": "it is 2"}) + "\n")
    with pytest.raises(ValueError, match="'solution'.*boxed"):
        load_benchmark(path, "minerva")
    with pytest.raises(ValueError, match="unknown benchmark format"):
        load_benchmark(path, "gsm8k")


def test_json_and_parquet_files(tmp_path) -> None:
    rows = [{"problem": "1+1?", "answer": "2", "unique_id": "a"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    assert load_benchmark(tmp_path / "m.json", "math500")[0].gold == "2"
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    assert load_benchmark(tmp_path / "m.parquet", "math500")[0].id == "a"


def test_parse_data_arg() -> None:
    name, fmt, path = parse_data_arg("aime24=aime:/x/a.jsonl")
    assert (name, fmt, str(path)) == ("aime24", "aime", "/x/a.jsonl")
    assert parse_data_arg("amc:b.json")[:2] == ("amc", "amc")
    with pytest.raises(ValueError, match="--data"):
        parse_data_arg("aime")
    with pytest.raises(ValueError, match="unknown format"):
        parse_data_arg("x=gsm8k:/a.jsonl")


# Correct counts out of 4 in responses.jsonl, decided by hand when the file was written (see the answers).
EXPECTED_CORRECT = {"math500": [3, 0, 2], "aime": [4, 1, 0], "amc": [2, 3, 1], "minerva": [3, 1, 4],
                    "olympiadbench": [1, 2, 3]}
# pass@2 of one problem with c of 4 correct: 1 - C(4 - c, 2) / C(4, 2)
PASS2 = {0: Fraction(0), 1: Fraction(1, 2), 2: Fraction(5, 6), 3: Fraction(1), 4: Fraction(1)}


def _expected(counts: list[int]) -> dict[str, float]:
    return {"avg": float(sum(Fraction(c, 4) for c in counts) / 3),
            "pass2": float(sum(PASS2[c] for c in counts) / 3),
            "pass4": float(Fraction(sum(c > 0 for c in counts), 3))}


def _sample_items() -> list:
    return [it for name, fmt, path in sample_benchmarks() for it in load_benchmark(path, fmt, name)]


def test_fixed_outputs_give_expected_scores(tmp_path, capsys) -> None:
    report = tmp_path / "report.json"
    code = eval_command.main(["--responses", str(RESPONSES), "--report", str(report),
                              "--grader-workers", "2"])
    assert code == 0
    data = json.loads(report.read_text())
    for bench in data["benchmarks"]:
        want = _expected(EXPECTED_CORRECT[bench["benchmark"]])
        assert bench["k"] == 4 and bench["num_problems"] == 3
        assert bench["avg_at_k"] == pytest.approx(want["avg"])
        assert bench["pass_at"]["1"] == pytest.approx(want["avg"])
        assert bench["pass_at"]["2"] == pytest.approx(want["pass2"])
        assert bench["pass_at"]["4"] == pytest.approx(want["pass4"])
    assert data["average"]["avg_at_k"] == pytest.approx(0.5)  # (5/12 + 5/12 + 1/2 + 2/3 + 1/2) / 5
    table = capsys.readouterr().out
    assert "olympiadbench" in table and "average" in table and "pass@4" in table


def test_grading_is_separate_from_generation() -> None:
    """summarize(grade_all(...)) with a stand-in grader: exact-match on the boxed text."""
    from trapo_megatron.eval.report import read_responses
    from trapo_megatron.reward.math_reward import last_boxed

    items = _sample_items()
    exact = lambda rs, gs: [float(last_boxed(r) == g) for r, g in zip(rs, gs)]
    results = summarize(items, grade_all(items, read_responses(RESPONSES), exact))
    aime = next(r for r in results if r.benchmark == "aime")
    assert aime.avg_at_k == pytest.approx(5 / 12)


def test_missing_responses_exit_2(tmp_path, capsys) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"benchmark": "aime", "id": "1", "responses": ["\\boxed{24}"]}) + "\n")
    assert eval_command.main(["--responses", str(path), "--data", f"aime:{SAMPLE_DIR / 'aime.jsonl'}"]) == 2
    assert "no responses" in capsys.readouterr().err
