"""The official TRAPO/LUFFY training parquet read as shipped (nested paths, named formats), the load report
naming every skipped row, the skip ceiling, and `trapo data inspect`."""

from __future__ import annotations

import json

import pytest
from official_layout import expert, problem, train_row, write_train
from rollout_tiny import tiny_tokenizer

from trapo_megatron.commands import main as trapo
from trapo_megatron.data import DataConfig, PromptConfig, load_examples, think_text
from trapo_megatron.data.dataset import load_for_run, parse_path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_official_training_file_gives_both_expert_solutions(tok, tmp_path):
    """format=verl: problem prompt[-1].content, gold reward_model.ground_truth, experts
    extra_info.answer_list[0] and [1] (MG2/MG3 and MG4 in the official code), each the stripped <think> text."""
    path = write_train(tmp_path / "train.parquet", [train_row(i) for i in range(4)])
    cfg = DataConfig(path=str(path), format="verl", expert_text="think")
    examples, stats = load_examples(cfg, PromptConfig(), tok)
    assert stats.num_rows == stats.num_kept == 4
    for i, ex in enumerate(examples):
        q, gold = problem(i)
        assert (ex.problem, ex.answer) == (q, gold)
        assert [tok.decode(s) for s in ex.solution_ids] == [think_text(expert(i, 0)), think_text(expert(i, 1))]
        assert tok.decode(ex.solution_ids[1]).startswith("Solution 1 of row")  # the official [1], stripped
    # LUFFY's layout: the one expert trace in target[-1].content
    luffy, _ = load_examples(DataConfig(path=str(path), format="luffy"), PromptConfig(), tok)
    assert [tok.decode(s) for s in luffy[0].solution_ids] == [expert(0, 0)]
    # an explicit path overrides the format's entry
    only_second = DataConfig(path=str(path), format="verl", solution_column="extra_info.answer_list[1]")
    assert tok.decode(load_examples(only_second, PromptConfig(), tok)[0][0].solution_ids[0]) == expert(0, 1)


def test_paths_and_config_errors():
    assert parse_path("prompt[-1].content") == ("prompt", -1, "content")
    assert parse_path("extra_info.answer_list[0]") == ("extra_info", "answer_list", 0)
    for bad in ("prompt..content", "[0]", "prompt[x]"):
        with pytest.raises(ValueError, match="data.problem_column: bad field path"):
            DataConfig(path="x", problem_column=bad)
    with pytest.raises(ValueError, match="data.max_skipped_fraction"):
        DataConfig(path="x", max_skipped_fraction=1.5)


# malformed rows at known indices: (index, how the row is broken, field named, reason)
MALFORMED = [
    (1, lambda r: r.update(prompt=[]), "prompt[-1].content", "is missing"),
    (3, lambda r: r["reward_model"].update(ground_truth=" "), "reward_model.ground_truth", "is empty"),
    (4, lambda r: r["extra_info"].update(answer_list=None), "extra_info.answer_list", "is missing"),
    (6, lambda r: r["extra_info"].update(answer_list=[]), "extra_info.answer_list", "is an empty list"),
    (7, lambda r: r["prompt"][-1].update(content="word " * 300), "prompt[-1].content",
     "gives a prompt over the limit ("),  # (N tokens > data.max_prompt_tokens=256)
]


def _malformed_file(tmp_path):
    rows = [train_row(i) for i in range(10)]
    for index, breaks, _, _ in MALFORMED:
        breaks(rows[index])
    return write_train(tmp_path / "train.parquet", rows)


def test_load_report_names_every_skipped_row(tok, tmp_path, capsys):
    cfg = DataConfig(path=str(_malformed_file(tmp_path)), format="verl", on_bad_row="skip", max_prompt_tokens=256,
                     max_skipped_fraction=0.5)
    report_path = tmp_path / "run" / "data_report.json"
    examples = load_for_run(cfg, PromptConfig(), tok, report_path)
    assert [e.index for e in examples] == [0, 2, 5, 8, 9]
    report = json.loads(report_path.read_text())
    assert (report["num_rows"], report["num_kept"], report["num_skipped"]) == (10, 5, 5)
    assert [(r["index"], r["field"]) for r in report["skipped_rows"]] == [(i, f) for i, _, f, _ in MALFORMED]
    assert all(r["reason"].startswith(m[3]) for r, m in zip(report["skipped_rows"], MALFORMED, strict=True))
    assert report["skipped_rows"][-1]["reason"].endswith("tokens > data.max_prompt_tokens=256)")
    assert report["skipped_by_reason"]["extra_info.answer_list: is missing"] == 1
    printed = capsys.readouterr().out
    assert "10 rows read, 5 kept, 5 skipped" in printed and "skipped 2: prompt[-1].content" not in printed


def test_skip_ceiling_fails_at_start_with_the_counts(tok, tmp_path):
    cfg = DataConfig(path=str(_malformed_file(tmp_path)), format="verl", on_bad_row="skip", max_prompt_tokens=256,
                     max_skipped_fraction=0.3)
    report_path = tmp_path / "data_report.json"
    with pytest.raises(ValueError, match=r"5 of 10 rows skipped \(50.0% > data.max_skipped_fraction=0.3\)") as e:
        load_for_run(cfg, PromptConfig(), tok, report_path)
    assert "'extra_info.answer_list: is an empty list': 1" in str(e.value)
    assert json.loads(report_path.read_text())["num_skipped"] == 5  # the report is written before failing


def test_data_inspect_prints_fields_example_and_report(tmp_path, capsys):
    path = _malformed_file(tmp_path)
    assert trapo(["data", "inspect", str(path), "format=verl", "expert_text=think"]) == 0
    out = capsys.readouterr().out
    assert "extra_info.answer_list[0]: str" in out and "reward_model.ground_truth: str" in out
    assert "example (row 0)" in out and repr(think_text(expert(0, 1)))[:40] in out
    assert "10 rows read, 6 kept, 4 skipped" in out  # no tokenizer: the prompt-length limit is not checked
    assert "row 6: extra_info.answer_list: is an empty list" in out
    assert trapo(["data", "inspect", str(path), "format=csv"]) == 2
