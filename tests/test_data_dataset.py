"""Loading OpenR1-style rows, prompt building, and bad-row handling (error names row + field, skip counts)."""

import json

import pytest
from rollout_tiny import FIXTURE, tiny_tokenizer

from trapo_megatron.data import (
    BadRowError,
    DataConfig,
    PromptConfig,
    build_examples,
    load_examples,
    prompt_text,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_load_jsonl_chat_prompt(tok):
    examples, stats = load_examples(DataConfig(path=FIXTURE, expert_text="think"), PromptConfig(), tok)
    assert stats.num_rows == stats.num_kept == 6 and stats.num_skipped == 0
    ex = examples[0]
    text = tok.decode(ex.prompt_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "= 11$.\nPlease reason step by step, and put your final answer within \\boxed{}." in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.solution_ids[0]).startswith("We need to isolate")  # inside <think> only
    assert len(examples[1].solution_ids) == 2  # a list column gives the second solution
    assert examples[5].answer == "21"  # an int answer becomes a string


def test_parquet_folder_plain_prompt_and_columns(tok, tmp_path):
    import datasets

    rows = [
        {
            "q": "347+285=",
            "a": "632",
            "s": "7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}",
            "s2": "alt \\boxed{632}",
        }
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "part-0.parquet"))
    cfg = DataConfig(
        path=str(tmp_path),
        problem_column="q",
        answer_column="a",
        solution_column="s",
        second_solution_column="s2",
    )
    examples, _ = load_examples(cfg, PromptConfig(template="plain", instruction=""), tok)
    assert tok.decode(examples[0].prompt_ids) == "347+285="
    assert [tok.decode(s) for s in examples[0].solution_ids] == [rows[0]["s"], rows[0]["s2"]]


def test_missing_column_is_named(tok):
    with pytest.raises(ValueError, match=r"no column\(s\) \['solutions'\]"):
        load_examples(DataConfig(path=FIXTURE, solution_column="solutions"), PromptConfig(), tok)


def test_chat_template_required(tok):
    plain_tok = tiny_tokenizer(chat=False)
    with pytest.raises(ValueError, match="template='plain'"):
        prompt_text("1+1", PromptConfig(template="chat"), plain_tok)


GOOD = {"problem": "1+1=", "answer": "2", "solution": "1+1=\\boxed{2}"}
BAD_ROWS = [
    ({**GOOD, "answer": ""}, "answer", "is empty"),
    ({k: v for k, v in GOOD.items() if k != "problem"}, "problem", "is missing"),
    ({**GOOD, "solution": 42}, "solution", "is not a string"),
    ({**GOOD, "solution": ["ok", None]}, "solution", "is missing"),
    ({**GOOD, "solution": []}, "solution", "is an empty list"),
    ({**GOOD, "solution": "   "}, "solution", "is empty"),
    ({**GOOD, "problem": "word " * 300}, "problem", "gives a prompt over the limit"),
]


@pytest.mark.parametrize("bad,column,kind", BAD_ROWS)
def test_bad_row_error_names_row_and_field(tok, bad, column, kind):
    rows = [GOOD, GOOD, bad, GOOD]
    cfg = DataConfig(path="unused", max_prompt_tokens=64)
    with pytest.raises(BadRowError, match=f"row 2: field '{column}' {kind}") as err:
        build_examples(rows, cfg, PromptConfig(template="plain"), tok)
    assert err.value.index == 2 and err.value.column == column


def test_skip_mode_counts(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [GOOD] + [b for b, _, _ in BAD_ROWS if not isinstance(b.get("solution"), (int, list))] + [GOOD]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(path=str(path), on_bad_row="skip", max_prompt_tokens=64)
    examples, stats = load_examples(cfg, PromptConfig(template="plain"), tok)
    assert [e.index for e in examples] == [0, len(rows) - 1]
    assert stats.num_rows == len(rows) and stats.num_kept == 2 and stats.num_skipped == len(rows) - 2
    assert stats.skipped == {
        "answer: is empty": 1,
        "problem: is missing": 1,
        "solution: is empty": 1,
        "problem: gives a prompt over the limit": 1,
    }
    # in-memory rows can mix types that a jsonl file cannot: every kind of bad row is counted
    _, stats = build_examples([GOOD] + [b for b, _, _ in BAD_ROWS], cfg, PromptConfig(template="plain"), tok)
    assert stats.num_skipped == len(BAD_ROWS) and stats.num_kept == 1


def test_solution_limit(tok):
    cfg = DataConfig(path="unused", max_solution_tokens=3)
    with pytest.raises(BadRowError, match="row 0: field 'solution' is over the limit"):
        build_examples([GOOD], cfg, PromptConfig(template="plain"), tok)


@pytest.mark.parametrize(
    "kwargs,knob",
    [({"on_bad_row": "warn"}, "data.on_bad_row"), ({"expert_text": "all"}, "data.expert_text")],
)
def test_config_errors(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        DataConfig(path="x", **kwargs)


def test_openr1_generations_filtered_by_correctness(tok):
    """OpenR1-Math-220k keeps several generations and a math-verify verdict per generation."""
    cfg = DataConfig(
        path="unused",
        solution_column="generations",
        solution_ok_column="correctness_math_verify",
        expert_text="think",
        on_bad_row="skip",
    )
    gens = [
        "<think>\nwrong\n</think> \\boxed{3}",
        "<think>\nright\n</think> \\boxed{2}",
        "<think>\nalso\n</think>",
    ]
    rows = [
        {**GOOD, "generations": gens, "correctness_math_verify": [False, True, True]},
        {**GOOD, "generations": gens, "correctness_math_verify": [False, False, False]},
        {**GOOD, "generations": gens, "correctness_math_verify": [True]},
    ]
    examples, stats = build_examples(rows, cfg, PromptConfig(template="plain"), tok)
    assert [tok.decode(s) for s in examples[0].solution_ids] == ["right", "also"]
    assert stats.skipped == {
        "correctness_math_verify: marks no solution correct": 1,
        "correctness_math_verify: does not match the solution list": 1,
    }
