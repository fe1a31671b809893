"""math-verify rewards in the process pool: real answer pairs, adversarial strings, timeouts, crashes."""

import os
import signal
import time

import pytest

from trapo_megatron.reward import MathRewardPool, RewardConfig, last_boxed, math_reward

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
    ("first \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),  # the LAST box counts
    ("first \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("$x = \\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1.0),
    ("The area is 21.", "21", 1.0),  # no box: the parsed answer
    ("I do not know.", "21", 0.0),
    ("\\boxed{12}", "12.0", 1.0),
]

ADVERSARIAL = [
    ("huge", "1" * 300_000, "1"),
    ("unbalanced braces", "\\boxed{" * 20_000 + "1", "1"),
    ("closing braces", "}" * 50_000 + "\\boxed{2}" + "{" * 50_000, "2"),
    ("tower of exponents", "\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "1"),
    ("factorial tower", "\\boxed{(2^{2^{100000}})!}", "3"),
    ("deep nesting", "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 801, "1"),
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


@pytest.fixture(scope="module")
def tight_pool():
    """Short limits for the adversarial strings (its workers fork from the same preloaded fork server)."""
    with MathRewardPool(RewardConfig(num_workers=2, timeout_s=1.0, backstop_timeout_s=2.5)) as p:
        yield p


def test_real_answer_pairs(pool):
    got = pool.score([r for r, _, _ in PAIRS], [g for _, g, _ in PAIRS])
    assert got == [e for _, _, e in PAIRS], [(p[0], p[2], g) for p, g in zip(PAIRS, got) if p[2] != g]
    assert pool.stats.num_timeouts == pool.stats.num_crashes == pool.stats.num_killed == 0


@pytest.mark.parametrize("name,response,gold", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_returns_within_the_timeout(tight_pool, name, response, gold):
    t0 = time.monotonic()
    assert tight_pool.score([response], [gold])[0] in (0.0, 1.0)
    assert time.monotonic() - t0 < tight_pool.cfg.backstop_timeout_s + 1.0, name


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
        (dict(num_workers=0), "reward.num_workers"),
        (dict(timeout_s=5, backstop_timeout_s=5), "reward.backstop_timeout_s"),
        (dict(start_method="fork"), "reward.start_method"),
    ],
)
def test_config_errors(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        RewardConfig(**kwargs)
