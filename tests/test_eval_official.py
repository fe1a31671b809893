"""`trapo eval` on the six official eval files (verl layout, AIME/AIME25/AMC repeated 32x): loading, merging
repeats, avg@k / pass@k through the CPU twin, data parallel over 2 replicas == 1 replica, and the grading
modes on hand-written responses where they disagree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from official_layout import VALID, problem, write_valid

from trapo_megatron.commands import eval as eval_command
from trapo_megatron.eval.benchmarks import load_benchmark
from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    return write_valid(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rollout_tiny import tiny_qwen2_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("model")
    tok = tiny_tokenizer()
    tok.save_pretrained(out)
    AutoModelForCausalLM.from_config(tiny_qwen2_config(len(tok))).save_pretrained(out)
    return out


def test_official_files_load_with_repeats_merged(valid) -> None:
    for name, (num_problems, repeats, _) in VALID.items():
        items = load_benchmark(valid[name], "verl", name)
        assert len(items) == num_problems and {it.repeats for it in items} == {repeats}, name
        assert len({it.id for it in items}) == num_problems
        q, gold = problem(1)
        assert (items[1].problem, items[1].gold) == (q, f"{gold}.0" if name == "amc" else gold)


def _data_args(valid: dict[str, Path]) -> list[str]:
    return [a for name, path in valid.items() for a in ("--data", f"{name}=verl:{path}")]


def _eval_args(valid, model_dir, out: Path) -> list[str]:
    return [*_data_args(valid), "--model", str(model_dir), "--engine", "cpu", "--limit", "2", "--n", "1",
            "--max-tokens", "3", "--temperature", "1.0", "--top-p", "1.0", "--grader-workers", "1",
            "--report", str(out / "report.json"), "--save-responses", str(out / "responses.jsonl")]


@pytest.fixture(scope="module")
def one_replica(valid, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert eval_command.main(_eval_args(valid, model_dir, out)) == 0
    return out


def test_eval_reports_avg_and_pass_at_k_on_the_official_files(one_replica) -> None:
    data = json.loads((one_replica / "report.json").read_text())
    ks = {b["benchmark"]: (b["num_problems"], b["k"], sorted(map(int, b["pass_at"]))) for b in data["benchmarks"]}
    assert ks["aime"] == ks["aime25"] == ks["amc"] == (2, 32, [1, 2, 4, 8, 16, 32])  # 32 rows -> 32 samples
    assert ks["math"] == ks["minerva"] == ks["olympiad_bench"] == (2, 1, [1])
    assert all(0.0 <= b["avg_at_k"] <= b["pass_at"][str(b["k"])] <= 1.0 for b in data["benchmarks"])
    meta = data["meta"]
    assert (meta["grading"], meta["n"], meta["temperature"], meta["top_p"], meta["num_replicas"]) == (
        "official_eval", 1, 1.0, 1.0, 1)
    assert meta["rows_per_problem"]["aime"] == 32 and meta["system"] == "You are a helpful assistant."
    responses = [json.loads(line) for line in (one_replica / "responses.jsonl").read_text().splitlines()]
    assert sum(len(r["responses"]) for r in responses) == 3 * 2 * 32 + 3 * 2
    assert len({t for r in responses for t in r["responses"]}) > 10  # per-request seeds: different samples


def dp_worker(rank: int, world: int, args: list[str]) -> int:
    return eval_command.main(args)


def test_two_replicas_give_the_one_replica_report(valid, model_dir, one_replica, tmp_path) -> None:
    """Each replica generates its strided share of the requests, rank 0 gathers, grades and reports: the
    responses (sample for sample) and the report equal a one-replica run's."""
    assert run_distributed(dp_worker, 2, _eval_args(valid, model_dir, tmp_path), timeout=400) == [0, 0]
    assert (tmp_path / "responses.jsonl").read_text() == (one_replica / "responses.jsonl").read_text()
    a, b = (json.loads((d / "report.json").read_text()) for d in (one_replica, tmp_path))
    for meta, replicas in ((a["meta"], 1), (b["meta"], 2)):
        assert meta.pop("num_replicas") == replicas
        del meta["report"], meta["save_responses"]
    assert a == b


# Hand-written responses where the modes disagree:
# (response, gold, official_eval, full, last_boxed, official_eval_think).
DISAGREE = [
    # a correct box followed by a long tail: the last-4,000-characters tail no longer holds it
    ("So $\\boxed{7}$. " + "Checking once more, every step holds. " * 150, "7", 1.0, 1.0, 0.0, 0.0),
    # the official split mode grades only the answer after </think>: the boxed 7 inside the thinking does not
    # count there; the official eval as eval.sh runs it grades the whole text
    ("<think>\nIt is \\boxed{7}.\n</think>\nThe answer is 8.", "7", 1.0, 1.0, 1.0, 0.0),
    # math-verify reads two boxes joined by a comma as a set {3, 4}; the official boxed fallback saves it
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0, 0.0, 1.0, 0.0),
]


@pytest.mark.parametrize("mode,column", [("official_eval", 2), ("full", 3), ("last_boxed", 4),
                                         ("official_eval_think", 5)])
def test_grading_modes_disagree_as_expected(tmp_path, mode, column) -> None:
    data = tmp_path / "b.jsonl"
    data.write_text("".join(json.dumps({"problem": f"p{i}", "answer": g, "id": str(i)}) + "\n"
                            for i, (_, g, *_) in enumerate(DISAGREE)))
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps({"benchmark": "b", "id": str(i), "responses": [r]}) + "\n"
                                 for i, (r, *_) in enumerate(DISAGREE)))
    report = tmp_path / "report.json"
    assert eval_command.main(["--data", f"b=flat:{data}", "--responses", str(responses), "--grading", mode,
                     "--grader-workers", "1", "--report", str(report)]) == 0
    out = json.loads(report.read_text())
    assert [s["scores"] for s in out["samples"]] == [[row[column]] for row in DISAGREE]
    assert out["meta"]["grading"] == mode
