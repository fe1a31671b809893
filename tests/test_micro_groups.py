"""The micro-group schedule against the paper's rule and the official code's rule, table-driven."""

import pytest

from trapo_megatron.algo.micro_groups import MicroGroupConfig, cut_length, decide

# (case, rewards of MG1..MG3 as they come out, expected guided flags of MG1..MG4)
# paper: guided iff mean(earlier) < t = (-1, 0.5, 0.7, 0.9); official: iff count(earlier) < (-, 2, 4, 7).
PAPER = [
    ("all wrong", [[0, 0, 0, 0], [0, 0], [0]], [False, True, True, True]),
    ("mean exactly 0.5 is not < 0.5", [[1, 1, 0, 0], [1, 1], [1]], [False, False, True, True]),
    ("4/6 < 0.7 guides MG3", [[1, 1, 1, 0], [1, 0], [1]], [False, False, True, True]),
    ("5/6 and 6/7 < 0.9", [[1, 1, 1, 0], [1, 1], [1]], [False, False, False, True]),
    ("guided returns count too", [[0, 0, 0, 0], [1, 1], [1]], [False, True, True, True]),
    ("all right", [[1, 1, 1, 1], [1, 1], [1]], [False, False, False, False]),
]
OFFICIAL = [
    ("all wrong", [[0, 0, 0, 0], [0, 0], [0]], [False, True, True, True]),
    ("1 of 4 < 2", [[1, 0, 0, 0], [1, 1], [1]], [False, True, True, True]),
    ("2 of 4 is not < 2; 4 of 6 is not < 4", [[1, 1, 0, 0], [1, 1], [1]], [False, False, False, True]),
    ("4 of 6 not < 4 where the paper guides", [[1, 1, 1, 0], [1, 0], [1]], [False, False, False, True]),
    ("3 of 6 < 4", [[1, 1, 1, 0], [0, 0], [1]], [False, False, True, True]),
    ("6 of 7 < 7 guides MG4", [[1, 1, 1, 1], [1, 1], [0]], [False, False, False, True]),
    ("7 of 7 never guided", [[1, 1, 1, 1], [1, 1], [1]], [False, False, False, False]),
]


def _run(cfg, rewards_per_mg, has_second=False):
    earlier, decisions = [], []
    for i in range(cfg.num_micro_groups):
        decisions.append(decide(cfg, i, earlier, has_second_solution=has_second))
        if i < len(rewards_per_mg):
            earlier = earlier + rewards_per_mg[i]
    return decisions


@pytest.mark.parametrize(
    "mode,case,rewards,expected", [("paper", *c) for c in PAPER] + [("official", *c) for c in OFFICIAL]
)
def test_schedule_rule(mode, case, rewards, expected):
    cfg = MicroGroupConfig(mode=mode)
    got = [d.guided for d in _run(cfg, rewards)]
    assert got == expected, case


@pytest.mark.parametrize(
    "mode,ratios", [("paper", (0.0, 0.2, 0.5, 1.0)), ("official", (0.0, 0.25, 0.5, 1.0))]
)
def test_decision_fields(mode, ratios):
    cfg = MicroGroupConfig(mode=mode)
    d = _run(cfg, [[0, 0, 0, 0], [0, 0], [0]], has_second=True)
    assert [x.size for x in d] == [4, 2, 1, 1] and cfg.group_size == 8
    assert [x.ratio for x in d] == list(ratios)
    assert [x.level for x in d] == [0, 1, 2, 3]
    assert [x.full_expert for x in d] == [False, False, False, True]
    # one sample per shared prefix carries SFT loss (the official [0, 1] for its guided pair)
    assert [x.sft_sample for x in d] == [None, 1, 0, 0]
    assert [x.use_second_solution for x in d] == [False, False, False, mode == "official"]
    unguided = _run(cfg, [[1, 1, 1, 1], [1, 1], [1]], has_second=True)
    assert all(x.ratio == 0.0 and x.sft_sample is None and not x.use_second_solution for x in unguided)


def test_second_solution_needs_a_second_solution():
    cfg = MicroGroupConfig(mode="official")
    assert not _run(cfg, [[0] * 4, [0] * 2, [0]], has_second=False)[3].use_second_solution


def test_custom_schedule_and_wrong_reward_count():
    cfg = MicroGroupConfig(mode="paper", sizes=(2, 2), ratios=(0.0, 0.5), thresholds=(-1, 0.75))
    assert cfg.group_size == 4 and decide(cfg, 1, [1, 0]).guided
    with pytest.raises(ValueError, match="needs the 2 earlier rewards"):
        decide(cfg, 1, [1])


@pytest.mark.parametrize(
    "kwargs,knob",
    [
        ({"ratios": (0.0, 0.2, 0.5)}, "micro_groups.ratios"),
        ({"thresholds": (0, 1)}, "micro_groups.thresholds"),
        ({"ratios": (0.1, 0.2, 0.5, 1.0)}, r"micro_groups.ratios\[0\]"),
        ({"ratios": (0.0, 0.2, 1.5, 1.0)}, r"micro_groups.ratios\[1:\]"),
        ({"sizes": (4, 0, 1, 1)}, "micro_groups.sizes"),
        ({"mode": "luffy"}, "micro_groups.mode"),
        ({"rounding": "round"}, "micro_groups.rounding"),
    ],
)
def test_config_errors_name_the_knob(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        MicroGroupConfig(**kwargs)


def test_cut_length_rounding():
    assert cut_length(10, 0.2, "ceil") == 2  # 0.2 * 10 = 2.0000000000000004 in floats: still 2
    assert cut_length(11, 0.2, "ceil") == 3 and cut_length(11, 0.2, "floor") == 2
    assert cut_length(7, 1.0, "ceil") == 7
