"""The official eval's grading (eval_scripts/generate_vllm.py + oat_math_grader.py boxed_reward_fn), cases
written from reading the official grader: math-verify on the whole text first, then the last box's content
accepted by any of three checks; here each check alone decides a response the first pass rejects."""

from __future__ import annotations

import pytest

from trapo_megatron.reward.math_reward import grade_full, grade_official_eval, grade_official_eval_think
from trapo_megatron.reward.official_grader import FALLBACK_CHECKS, boxed_content

# (response, gold, the one check that accepts the last box's content)
DECIDED_BY = [
    # two boxes read as a set by the first pass; the last one's unit word goes in the MATH normalisation
    ("First \\boxed{2}, corrected: \\boxed{3 \\text{ dollars}}", "\\$3", "mathd"),
    # a mixed number: 7 3/4 -> 7+3/4, whose difference with 31/4 simplifies to 0
    ("So $x = \\boxed{7 3/4}$.", "31/4", "sympy"),
    # two boxes read as a set by the first pass; the last one's 2/4 equals 1/2 for math-verify only (mathd
    # keeps \frac{2}{4}, and two fractions must match as written for the sympy check)
    ("First \\boxed{3}, corrected: \\boxed{\\frac{2}{4}}", "\\frac12", "verify"),
]


@pytest.mark.parametrize("response,gold,check", DECIDED_BY)
def test_each_fallback_check_decides_alone(response, gold, check):
    given = boxed_content(response)
    assert {name: f(given, gold) for name, f in FALLBACK_CHECKS.items()} == {
        name: name == check for name in FALLBACK_CHECKS}
    assert grade_full(response, gold) == 0.0  # math-verify on the whole text says no
    assert grade_official_eval(response, gold) == 1.0  # the official script says yes


@pytest.mark.parametrize("response,gold,official", [
    ("\\fbox{4}", "4", 0.0),  # \fbox is searched only without \boxed, and its content is never read
    ("\\boxed {4}", "4", 0.0),  # the span must start with "\boxed{"
    ("\\boxed{[1,2)}", "[1,2]", 0.0),  # an interval's brackets must match
    ("x \\boxed{\\text{5 meters}}", "5", 1.0),  # \text{} and units go in every check
    ("So \\boxed{6}.", "\\boxed{6}", 1.0),  # a gold holding a box is reduced to its content
    ("So $\\boxed{7}$. " + "Checking once more, every step holds. " * 150, "7", 1.0),  # whole text, no tail cut
])
def test_official_outcomes(response, gold, official):
    assert grade_official_eval(response, gold) == official


def test_split_mode_grades_between_the_first_and_second_think_end():
    response = "<think>\nIt is \\boxed{7}.\n</think>\nThe answer is \\boxed{8}. </think> \\boxed{7}"
    assert grade_official_eval(response, "7") == 1.0  # eval.sh's setting: the whole text, the last box 7
    assert grade_official_eval_think(response, "8") == 1.0 and grade_official_eval_think(response, "7") == 0.0
    assert grade_official_eval_think("no tag \\boxed{7}", "7") == 0.0  # split mode without </think>: 0


def test_official_eval_preset_and_the_simplerl_prompt():
    import argparse

    from rollout_tiny import tiny_tokenizer

    from trapo_megatron.commands.eval import RAW_TEMPLATES, add_eval_arguments
    from trapo_megatron.data.prompts import PromptConfig, encode_prompt

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--preset", "official"])
    assert (args.temperature, args.top_p, args.max_tokens, args.n, args.prompt_template, args.grading,
            args.memory_fraction) == (0.6, 1.0, 8192, 1, "simplerl", "official_eval", 0.85)
    assert parser.parse_args(["--preset", "official", "--n", "4"]).n == 4  # flags after it win
    tok = tiny_tokenizer()
    ids = encode_prompt("Find x.", PromptConfig(template="raw", raw_template=RAW_TEMPLATES["simplerl"]), tok)
    # the official string: no space before \boxed, doubled braces (not a format string there)
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "Find x.\nPlease reason step by step, and put your final answer within"
                               "\\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n")
