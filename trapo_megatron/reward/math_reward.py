"""Binary math rewards with math-verify, graded in worker processes that can be killed.

Why processes, and why this shape:
- math-verify's timeouts use SIGALRM, which only works in a process's main thread: never grade in threads.
- SIGALRM cannot interrupt C code (a huge integer power inside sympy): only killing the process stops it.
  So each worker owns a pipe, the parent knows which item each worker holds and since when, and a worker
  past the backstop is killed and replaced. A crashed worker is replaced the same way.
- A timeout, a kill or a crash scores 0 and is counted (``stats``); it never stops training.
- math-verify logs the whole input on a parse timeout: its loggers are quieted in the workers (we pass
  ``parsing_timeout=None`` and time items ourselves, so its own timeout never fires).

Grading modes (``reward.mode``, one function each in GRADERS):
- "full" (default; the official TRAPO/LUFFY reward, luffy_src/math_verify_reward.py): math-verify parses the
  WHOLE decoded response and compares it with parse("$" + gold + "$"). Nothing is cut: the per-item timeout
  and the backstop bound the time instead.
- "last_boxed": only the last \\boxed{...} in the response's last ``max_response_chars`` characters (or, with
  no box, what math-verify parses from that tail) counts.
- "official_eval": the official evaluation script (Su-my/TRAPO eval_scripts/generate_vllm.py:162-208, as
  eval.sh runs it): math-verify on the WHOLE response as "full"; when that fails, the official boxed
  fallback (oat_math_grader.py boxed_reward_fn: the last \boxed{} of the whole text accepted by a
  mathd-normalised string match, a sympy difference or math-verify on the boxed content; any passes;
  reward/official_grader.py).
- "official_eval_think": the script's split mode (a prompt ending in "<think>\n", or
  --add_think_before_answer): "<think>\n" is put before the response and only the text between the first
  and the second "</think>" is graded as "official_eval"; a response without "</think>" scores 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Literal, Self

from trapo_megatron.reward.official_grader import boxed_fallback

_QUIET_LOGGERS = ("math_verify", "latex2sympy2_extended", "sympy")


@dataclass(kw_only=True)
class RewardConfig:
    """The grading pool."""

    mode: Literal["full", "last_boxed", "official_eval", "official_eval_think"] = "full"
    """How a response is graded (module docstring): "full" is the official training reward."""
    num_workers: int = 4
    """Worker processes (each grades one item at a time)."""
    timeout_s: float = 5.0
    """Hard per-item limit inside the worker (SIGALRM around parse + verify); past it the item scores 0."""
    backstop_timeout_s: float = 15.0
    """Per-item limit seen from the parent: a worker still busy after this long is killed and replaced."""
    max_response_chars: int = 4000
    """mode "last_boxed" only: the last this-many characters of a response are searched."""
    max_gold_chars: int = 1000
    """A longer gold answer is cut (golds are short; this only bounds a malformed row)."""
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    """How workers start; never "fork" from a trainer that holds threads and CUDA state."""
    startup_timeout_s: float = 120.0
    """How long a new worker may take to import math-verify and report ready."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")
        if not 0 < self.timeout_s < self.backstop_timeout_s:
            raise ValueError(
                f"reward.backstop_timeout_s ({self.backstop_timeout_s}) must exceed reward.timeout_s "
                f"({self.timeout_s}) > 0"
            )
        if self.mode not in GRADERS:
            raise ValueError(f"reward.mode must be one of {sorted(GRADERS)}, got {self.mode!r}")
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"reward.start_method must be 'forkserver' or 'spawn', got {self.start_method!r}"
            )


@dataclass
class RewardStats:
    """Counts since the pool was built (items, not calls)."""

    num_graded: int = 0
    num_correct: int = 0
    num_timeouts: int = 0
    """Items stopped by the in-worker per-item timeout."""
    num_killed: int = 0
    """Items whose worker was killed at the backstop timeout."""
    num_crashes: int = 0
    """Items whose worker died while grading them."""
    num_errors: int = 0
    """Items where math-verify raised (scored 0)."""
    grade_seconds: float = 0.0
    """Sum of per-item grading time measured in the workers."""
    by_status: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- grading


def last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} in ``text``, or None. One pass to match braces, then a
    backward search: linear time even on thousands of unclosed boxes (no regex backtracking)."""
    close_of: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            close_of[stack.pop()] = i
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i in close_of and text[i] == "{":
            return text[i + 1 : close_of[i]]
        start = text.rfind("\\boxed", 0, start)
    return None


def _parse(text: str) -> list:
    """math-verify's parse with its own SIGALRM timeout off (the pool's worker times each item)."""
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _verify(gold_parsed: list, pred: list) -> float:
    from math_verify import verify

    if not pred or not gold_parsed:
        return 0.0
    return float(verify(gold_parsed, pred, timeout_seconds=None))


def grade_full(response: str, gold: str, *, max_response_chars: int = 4000, max_gold_chars: int = 1000) -> float:
    """The official reward: math-verify on the whole response against parse("$" + gold + "$").
    ``max_response_chars`` is not used: nothing of the response is cut."""
    return _verify(_parse(f"${gold[:max_gold_chars]}$"), _parse(response))


def grade_last_boxed(response: str, gold: str, *, max_response_chars: int = 4000, max_gold_chars: int = 1000,
                     ) -> float:
    """1.0 iff the last \\boxed{} of the response tail (or the answer parsed from the tail) equals ``gold``."""
    tail = response[-max_response_chars:]
    boxed = last_boxed(tail)
    pred = _parse(f"\\boxed{{{boxed}}}" if boxed is not None else tail)
    gold = gold[:max_gold_chars]
    return _verify(_parse(f"\\boxed{{{gold}}}") or _parse(gold), pred)


def grade_official_eval(response: str, gold: str, *, max_response_chars: int = 4000, max_gold_chars: int = 1000,
                        ) -> float:
    """The official eval script on the whole text: math-verify in full, then the official boxed fallback."""
    if grade_full(response, gold, max_gold_chars=max_gold_chars):
        return 1.0
    return boxed_fallback(response, gold[:max_gold_chars])


def grade_official_eval_think(response: str, gold: str, *, max_response_chars: int = 4000,
                              max_gold_chars: int = 1000) -> float:
    """The official eval script's split mode: the text between the first and second "</think>" of
    "<think>\n" + response, graded as "official_eval"; no "</think>": 0."""
    parts = ("<think>\n" + response).split("</think>")
    if len(parts) < 2:
        return 0.0
    return grade_official_eval(parts[1], gold, max_gold_chars=max_gold_chars)


GRADERS: dict[str, Callable[..., float]] = {
    "full": grade_full,
    "last_boxed": grade_last_boxed,
    "official_eval": grade_official_eval,
    "official_eval_think": grade_official_eval_think,
}
"""reward.mode -> grading function (response, gold, max_response_chars=, max_gold_chars=) -> 0.0 | 1.0."""


def grade(response: str, gold: str, *, mode: str = "full", max_response_chars: int = 4000,
          max_gold_chars: int = 1000) -> float:
    """The reward of one response in ``mode`` (a key of GRADERS).

    No timeout here: run it under one (the pool does), as sympy can take unbounded time.
    """
    return GRADERS[mode](response, gold, max_response_chars=max_response_chars, max_gold_chars=max_gold_chars)


class _ItemTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _ItemTimeout()


_TRAINER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
"""Signals meant for the trainer (its stop signals, Slurm's warning and limit, Ctrl-C)."""


def _worker_main(conn: Connection, cfg: RewardConfig) -> None:
    # Inherited from MathRewardPool._spawn already, unless the process's fork server was started elsewhere.
    signal.pthread_sigmask(signal.SIG_BLOCK, _TRAINER_SIGNALS)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401 - import before reporting ready, so grading time excludes it

    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, response, gold = msg
        t0 = time.perf_counter()
        score, status = 0.0, "ok"
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, cfg.timeout_s)
                score = grade(response, gold, mode=cfg.mode, max_response_chars=cfg.max_response_chars,
                              max_gold_chars=cfg.max_gold_chars)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _ItemTimeout:
            score, status = 0.0, "timeout"
        except Exception:  # noqa: BLE001 - a grading error scores 0 and is counted
            score, status = 0.0, "error"
        conn.send((idx, score, status, time.perf_counter() - t0))


# ------------------------------------------------------------------------------------------------- pool


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    item: int | None = None
    since: float = 0.0


class MathRewardPool:
    """Grades (response, gold) pairs in killable worker processes.

    Usage:
        with MathRewardPool(RewardConfig(num_workers=2)) as pool:
            pool.score(["... so the answer is \\\\boxed{\\\\frac{1}{2}}"], ["0.5"])  # -> [1.0]
            pool.stats.num_timeouts
    Workers start lazily on the first ``score`` and live until ``close``.
    """

    _target = staticmethod(_worker_main)  # the worker loop; tests swap in one that crashes on demand
    _max_startup_failures = 3

    def __init__(self, cfg: RewardConfig | None = None):
        self.cfg = cfg or RewardConfig()
        self.stats = RewardStats()
        self._ctx = mp.get_context(self.cfg.start_method)
        if self.cfg.start_method == "forkserver":
            # import math-verify (~2-5 s) once in the fork server, not once per worker and per replacement
            self._ctx.set_forkserver_preload(["math_verify"])
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self.item_seconds: list[float] = []
        """Per item of the last ``score`` call: seconds from handing it to a worker to having its score
        (what a caller waits for one item; bounded by the backstop plus the time to notice)."""

    # lifecycle
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2)
            w.conn.close()
        self._workers = []

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=self._target, args=(child, self.cfg), daemon=True)
        # The pool owns its workers' lives (SIGKILL at the backstop and on close; EOF on the pipe when the
        # trainer dies). The trainer's stop signals must not reach them: Slurm signals the whole process
        # tree, and a worker killed mid-grade would score a correct answer 0. A blocked signal stays blocked
        # across fork and exec, so the fork server and every worker it forks inherit the mask; in this thread
        # a signal that arrives meanwhile is only delayed until the mask is restored. The resource tracker
        # starts first: its ensure_running blocks and then UNBLOCKS SIGINT/SIGTERM in this thread
        # (multiprocessing/resource_tracker.py), which would undo the mask before the fork server starts.
        resource_tracker.ensure_running()
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, _TRAINER_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        child.close()
        return _Worker(proc=proc, conn=parent, since=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn()

    def _count(self, status: str, score: float, seconds: float = 0.0) -> None:
        s = self.stats
        s.num_graded += 1
        s.num_correct += int(score > 0)
        s.grade_seconds += seconds
        s.by_status[status] = s.by_status.get(status, 0) + 1
        attr = {
            "timeout": "num_timeouts",
            "killed": "num_killed",
            "crash": "num_crashes",
            "error": "num_errors",
        }
        if status in attr:
            setattr(s, attr[status], getattr(s, attr[status]) + 1)

    # grading
    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        """Rewards in input order; every item gets a score, whatever happens to the workers."""
        if len(responses) != len(golds):
            raise ValueError(f"score: {len(responses)} responses but {len(golds)} golds")
        while len(self._workers) < self.cfg.num_workers:
            self._workers.append(self._spawn())
        scores: list[float | None] = [None] * len(responses)
        self.item_seconds = [0.0] * len(responses)
        pending = list(range(len(responses)))[::-1]
        while any(s is None for s in scores):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.item is None and pending:
                    w.item, w.since = pending.pop(), now
                    w.conn.send((w.item, responses[w.item], golds[w.item]))
            self._wait_and_collect(scores)
        return [float(s) for s in scores]

    def _wait_and_collect(self, scores: list) -> None:
        now = time.monotonic()
        deadlines = [
            w.since + (self.cfg.backstop_timeout_s if w.ready else self.cfg.startup_timeout_s)
            for w in self._workers
            if w.item is not None or not w.ready
        ]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        by_conn = {w.conn: w for w in self._workers}
        by_sentinel = {w.proc.sentinel: w for w in self._workers}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        for obj in ready:
            w = by_conn.get(obj)
            if w is not None and w in self._workers:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    continue  # the sentinel reports the death
                if msg == "ready":
                    w.ready = True
                else:
                    idx, score, status, seconds = msg
                    scores[idx], w.item = score, None
                    self.item_seconds[idx] = time.monotonic() - w.since
                    self._count(status, score, seconds)
        for obj in ready:
            w = by_sentinel.get(obj)
            if w is not None and w in self._workers and not w.proc.is_alive():
                self._fail(w, scores, "crash")
        now = time.monotonic()
        for w in list(self._workers):
            if w.item is not None and now - w.since > self.cfg.backstop_timeout_s:
                self._fail(w, scores, "killed")
            elif not w.ready and now - w.since > self.cfg.startup_timeout_s:
                raise RuntimeError(
                    f"a reward worker did not start within reward.startup_timeout_s="
                    f"{self.cfg.startup_timeout_s}"
                )

    def _fail(self, w: _Worker, scores: list, status: str) -> None:
        if not w.ready:
            self._startup_failures += 1
            if self._startup_failures >= self._max_startup_failures:
                self.close()
                raise RuntimeError(
                    f"reward workers died {self._startup_failures} times while starting "
                    f"(exit code {w.proc.exitcode}); is math-verify installed?"
                )
        if w.item is not None and scores[w.item] is None:
            scores[w.item] = 0.0
            self.item_seconds[w.item] = time.monotonic() - w.since
            self._count(status, 0.0)
        w.item = None
        self._replace(w)
