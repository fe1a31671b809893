"""math-verify rewards in the process pool: real answer pairs, adversarial strings, timeouts, crashes."""

import os
import random
import signal
import time

import pytest

from trapo_megatron.reward import MathRewardPool, RewardConfig, last_boxed, math_reward
from trapo_megatron.reward.math_reward import GRADERS, grade

# (response, gold, expected reward)
PAIRS = [
    ("The sum is $\\boxed{\\frac{5}{6}}$.", "\\frac{5}{6}", 1.0),
    ("So the answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # decimal vs fraction
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The roots are \\boxed{\\{3, 2\\}}", "\\{2, 3\\}", 1.0),  # sets: order does not matter
    ("The answer is $\\boxed{(-2, 2)}$", "(-2, 2)", 1.0),  # interval
    ("The answer is $\\boxed{[-2, 2]}$", "(-2, 2)", 0.0),  # closed vs open interval
    ("7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}", "632", 1.0),  # the toy task
    ("7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{633}", "632", 0.0),
    ("first \\boxed{3}. Corrected: \\boxed{4}", "4", 1.0),  # the LAST box counts
    ("first \\boxed{4}. Corrected: \\boxed{3}", "4", 0.0),
    ("$x = \\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1.0),
    ("The area is 21.", "21", 1.0),  # no box: the parsed answer
    ("I do not know.", "21", 0.0),
    ("\\boxed{12}", "12.0", 1.0),
]

def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {x}") == "x"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unclosed last box falls back to the previous
    assert last_boxed("none") is None


@pytest.fixture(scope="module")
def pool():
    """Generous limits: real pairs must never time out, even on a loaded machine."""
    with MathRewardPool(RewardConfig(num_workers=2, timeout_s=5.0, backstop_timeout_s=10.0)) as p:
        yield p


def test_real_answer_pairs(pool):
    """The default mode ("full", the official reward) through the pool."""
    assert pool.cfg.mode == "full"
    got = pool.score([r for r, _, _ in PAIRS], [g for _, g, _ in PAIRS])
    assert got == [e for _, _, e in PAIRS], [(p[0], p[2], g) for p, g in zip(PAIRS, got) if p[2] != g]
    assert pool.stats.num_timeouts == pool.stats.num_crashes == pool.stats.num_killed == 0


@pytest.mark.parametrize("mode", sorted(GRADERS))
def test_every_mode_grades_short_answers_alike(mode):
    head = "thinking </think>" if mode == "official_eval_think" else ""  # that mode reads after </think> only
    assert [grade(head + r, g, mode=mode) for r, g, _ in PAIRS] == [e for _, _, e in PAIRS]


# (response, gold, full, last_boxed): where the official full-response reward and the last-boxed tail differ
MODES_DISAGREE = [
    ("\\boxed{7} " + "and some more words to close. " * 200, "7", 1.0, 0.0),  # the box is out of the tail
    ("I think it is $\\frac{1}{2}$, the final answer is 0.5 \\boxed{}", "\\frac12", 1.0, 0.0),  # an empty box
    ("first \\boxed{3}, corrected: \\boxed{4}", "4", 0.0, 1.0),  # math-verify reads "boxes, boxes" as a set
]


@pytest.mark.parametrize("response,gold,full,boxed", MODES_DISAGREE)
def test_full_and_last_boxed_disagree(response, gold, full, boxed):
    assert grade(response, gold, mode="full") == full
    assert grade(response, gold, mode="last_boxed", max_response_chars=4000) == boxed


# ------------------------------------------------------------------------------ 1,000 adversarial answers
# Golds are numbers whose digits never occur in the junk, so a wrong answer cannot be right by accident.
_JUNK = "".join(chr(c) for c in range(256) if not chr(c).isdigit() and chr(c) not in "²³¹¼½¾")
_WORDS = ["so", "we", "check", "the", "work", "again", "and", "again", "without", "any", "new", "value", "here"]


def _prose(rng: random.Random, num_chars: int) -> str:
    out, n = [], 0
    while n < num_chars:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def _adversarial(rng: random.Random) -> tuple[str, str, str, float | None]:
    """(kind, response, gold, expected): expected 1.0 (correct, must score 1), 0.0 (wrong, must score 0)."""
    gold = str(rng.randint(1000, 99999))
    wrong = str(int(gold) + rng.randint(1, 50))
    kind = rng.choices(
        ["tail", "early", "fraction", "corrected_wrong", "gold_mentioned", "huge", "unbalanced", "closing",
         "tower", "factorial", "nesting", "junk", "junk_boxed", "dollars"],
        weights=[20, 20, 8, 10, 8, 4, 3, 4, 1.5, 1, 1.5, 10, 6, 3])[0]
    if kind == "tail":  # a correct answer followed by a long tail (what a cut-at-the-end reward loses)
        return kind, f"The answer is $\\boxed{{{gold}}}$. " + _prose(rng, rng.randint(100, 60_000)), gold, 1.0
    if kind == "early":  # a correct answer early in a long text
        text = _prose(rng, rng.randint(100, 40_000)) + f" \\boxed{{{gold}}} " + _prose(rng, rng.randint(0, 40_000))
        return kind, text, gold, 1.0
    if kind == "fraction":  # an equivalent form
        return kind, _prose(rng, rng.randint(0, 20_000)) + f" \\boxed{{\\frac{{{2 * int(gold)}}}{{2}}}}", gold, 1.0
    if kind == "corrected_wrong":  # right first, then corrected to a wrong value: the last answer counts
        return kind, f"\\boxed{{{gold}}} " + _prose(rng, rng.randint(0, 20_000)) + f" \\boxed{{{wrong}}}", gold, 0.0
    if kind == "gold_mentioned":
        return kind, f"It is not ${gold}$. " + _prose(rng, rng.randint(0, 20_000)) + f" \\boxed{{{wrong}}}", gold, 0.0
    if kind == "huge":
        return kind, rng.choice("0x") * rng.randint(100_000, 1_000_000), gold, 0.0
    if kind == "unbalanced":
        return kind, "\\boxed{" * rng.randint(1_000, 5_000) + wrong, gold, 0.0
    if kind == "closing":
        n = rng.randint(1_000, 60_000)
        return kind, "}" * n + f"\\boxed{{{wrong}}}" + "{" * n, gold, 0.0
    if kind == "tower":
        return kind, "\\boxed{" + "9^{" * rng.randint(4, 12) + "9" + "}" * 13, gold, 0.0
    if kind == "factorial":
        return kind, f"\\boxed{{(2^{{2^{{{rng.randint(1000, 100_000)}}}}})!}}", gold, 0.0
    if kind == "nesting":
        depth = rng.randint(100, 500)
        return kind, "\\boxed{" + "\\frac{1}{" * depth + "2" + "}" * (2 * depth + 1), gold, 0.0
    if kind == "junk":  # binary junk
        return kind, "".join(rng.choices(_JUNK, k=rng.randint(10, 50_000))), gold, 0.0
    if kind == "junk_boxed":  # junk inside and around a box
        junk = "".join(rng.choices(_JUNK, k=rng.randint(10, 5_000)))
        return kind, junk + "\\boxed{" + junk[: rng.randint(0, 200)] + "}" + junk, gold, 0.0
    n = rng.randint(1_000, 50_000)  # dollars: unbalanced math delimiters
    return kind, "$" * n + "\\frac{" * rng.randint(0, 500) + wrong, gold, 0.0


def test_1000_adversarial_answers():
    """Zero hangs, each answer within the timeout + a small margin, nothing wrong scores 1 and no correct
    answer scores 0. Figures (answers tried, worst time) are printed for the README."""
    rng = random.Random(20261201)
    cases = [_adversarial(rng) for _ in range(1000)]
    cfg = RewardConfig(num_workers=2, timeout_s=1.0, backstop_timeout_s=2.0)
    with MathRewardPool(cfg) as pool:
        t0 = time.monotonic()
        got = pool.score([c[1] for c in cases], [c[2] for c in cases])
        wall = time.monotonic() - t0
        seconds, stats = pool.item_seconds, pool.stats
    wrong = [(c[0], c[1][:80], c[2], g) for c, g in zip(cases, got) if g != c[3]]
    assert not wrong, wrong[:10]
    worst = max(range(len(cases)), key=seconds.__getitem__)
    kinds = sorted({c[0] for c in cases})
    print(f"\n1,000 adversarial answers ({len(kinds)} kinds) in {wall:.1f} s; worst {seconds[worst]:.2f} s "
          f"({cases[worst][0]}); timeouts {stats.num_timeouts}, killed {stats.num_killed}, "
          f"errors {stats.num_errors}, crashes {stats.num_crashes}")
    # The bound is the backstop (a regex in C can hold off the per-item alarm); the margin covers killing and
    # replacing a worker on a loaded 2-core machine (2.54 s seen at load 15), not a hang.
    assert seconds[worst] <= cfg.backstop_timeout_s + 1.5, (cases[worst][0], seconds[worst])
    assert sum(c[3] == 1.0 for c in cases) >= 300 and len(kinds) == 14


def test_several_items_keep_input_order(pool):
    assert pool.score(["\\boxed{0.5}", "\\boxed{7}"], ["1/2", "8"]) == [1.0, 0.0]


def test_empty_batch(pool):
    assert pool.score([], []) == []


def test_length_mismatch_is_an_error(pool):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        pool.score(["a", "b"], ["1"])


def _flaky_worker(conn, cfg):
    """The real worker loop, with grade() made to hang in a way SIGALRM cannot stop, or to crash."""
    real = math_reward.grade

    def flaky(response, gold, **kw):
        if response == "__hang__":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if response == "__crash__":
            os._exit(3)
        return real(response, gold, **kw)

    math_reward.grade = flaky
    math_reward._worker_main(conn, cfg)


class _FlakyPool(MathRewardPool):
    _target = staticmethod(_flaky_worker)


def test_hang_and_crash_score_zero_and_are_counted():
    cfg = RewardConfig(num_workers=2, timeout_s=2.0, backstop_timeout_s=3.0)
    with _FlakyPool(cfg) as pool:
        t0 = time.monotonic()
        got = pool.score(
            ["__hang__", "\\boxed{1}", "__crash__", "\\boxed{2}", "\\boxed{3}"], ["1", "1", "1", "2", "4"]
        )
        elapsed = time.monotonic() - t0
        assert got == [0.0, 1.0, 0.0, 1.0, 0.0]
        assert pool.stats.num_killed == 1 and pool.stats.num_crashes == 1 and pool.stats.num_graded == 5
        assert elapsed < 15, elapsed  # includes starting the replacement workers
        assert pool.score(["\\boxed{5}"], ["5"]) == [1.0]  # the pool keeps working


@pytest.mark.parametrize(
    "kwargs,knob",
    [
        ({"num_workers": 0}, "reward.num_workers"),
        ({"timeout_s": 5, "backstop_timeout_s": 5}, "reward.backstop_timeout_s"),
        ({"start_method": "fork"}, "reward.start_method"),
        ({"mode": "boxed"}, "reward.mode"),
    ],
)
def test_config_errors(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        RewardConfig(**kwargs)


def test_trainer_stop_signals_do_not_reach_the_graders():
    """Slurm signals the whole process tree (its warning, the limit's SIGTERM): the grading workers and the
    fork server must survive them, or a correct answer graded at that moment scores 0 as a crash. The
    parent still gets its own signal (the trainer's graceful stop)."""
    import os
    import signal

    import psutil

    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: got.append(signum))
    try:
        with MathRewardPool(RewardConfig(num_workers=2)) as pool:
            assert pool.score(["\\boxed{2}"], ["2"]) == [1.0]
            from multiprocessing import forkserver

            pids = [w.proc.pid for w in pool._workers] + [forkserver._forkserver._forkserver_pid]
            graders = [psutil.Process(pid) for pid in pids]  # the two workers and the fork server
            for p in graders:
                for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
                    os.kill(p.pid, sig)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)
            assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in graders)
            assert got == [signal.SIGUSR1]
            pool._replace(pool._workers[0])  # the fork server still forks replacements
            assert pool.score(["\\boxed{3}"] * 4, ["3"] * 4) == [1.0] * 4
            assert pool.stats.num_crashes == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
