"""Reliability of real `trapo train` runs (TP=2, one OS process per rank, tiny demo config): kill -9 of every
process at named points then --resume, a graceful SIGTERM stop, NaN losses skipped on every rank, and a
run that stops after too many non-finite steps. The oracle is always an uninterrupted run (or one resumed
from its checkpoint): every step's metrics but the timings must be equal, each step logged once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _launch_helpers import MAX_STEPS, latest, launch, metrics, tiny

from trapo_megatron.commands.demo import CONFIG
from trapo_megatron.testing import free_port
from trapo_megatron.train.stopping import EXIT_DIVERGED, EXIT_STOPPED

pytestmark = pytest.mark.timeout(1200)

KILLED = [-9, -9]

# (fault, what `latest` names afterwards): one run, killed again and again, each time resumed.
CHAIN = [
    ("rollout:1:kill", None),  # during step 1's rollout: nothing saved yet
    ("mid_save:2:kill:1", None),  # rank 1's shards of step 2 written; no completion marker, latest not moved
    ("after_latest:2:kill", "step_000002"),  # the partial step_000002 was deleted and redone; latest moved
    ("optimizer:3:kill:1", "step_000002"),  # gradients reduced, the update not applied
    ("step_start:4:kill", "step_000002"),  # between steps: step 3 logged but not saved (its row is dropped)
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert launch(tiny(out)) == [0, 0]
    return out


def test_kill_anywhere_then_resume_equals_the_uninterrupted_run(baseline: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    expected = metrics(baseline)
    assert [r["step"] for r in expected] == list(range(1, MAX_STEPS + 1))
    for r in expected:  # accounting: every sample graded once (2 prompts x 8), nothing scored 0 by the pool
        assert r["reward_num_graded"] == 16 and 0 < r["num_generated"] <= 16  # L=1.0 samples: no generation
        assert r["reward_num_timeouts"] == r["reward_num_killed"] == r["reward_num_crashes"] == 0
    for i, (fault, pointer) in enumerate(CHAIN):
        assert launch(tiny(out), resume=i > 0, fault=fault) == KILLED, fault
        if pointer is None:
            assert not (out / "checkpoints" / "latest").exists(), fault
        else:
            assert latest(out) == pointer, fault
        if fault.startswith("mid_save"):  # the partial directory the next launch must not use
            assert (out / "checkpoints" / "step_000002").is_dir()
            assert not (out / "checkpoints" / "step_000002" / "complete.json").exists()
    # a graceful stop (SIGTERM to rank 1 only, mid-step 5): every rank ends after step 5 with a checkpoint
    assert launch(tiny(out), resume=True, fault="optimizer:5:term:1") == [EXIT_STOPPED] * 2
    assert latest(out) == "step_000005"
    assert [r["step"] for r in metrics(out)] == list(range(1, 6))
    assert launch(tiny(out), resume=True) == [0, 0]
    assert metrics(out) == expected  # every step once, equal to the uninterrupted run's


def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(baseline: Path, tmp_path: Path) -> None:
    """A NaN loss at step 3 on rank 1 only: step 3's update is skipped on both ranks and counted. "Skipped":
    weights, optimizer state and LR schedule stay as after step 2; step 3's prompts are consumed. The oracle
    is the uninterrupted run's step-2 checkpoint resumed as if it were step 3 (one skip counted)."""
    out = tmp_path / "nan"
    assert launch(tiny(out), fault="loss:3:nan:1") == [0, 0]
    rows = {r["step"]: r for r in metrics(out)}
    assert rows[3]["update_skipped"] == 1.0 and rows[3]["num_skipped_total"] == 1
    assert all(rows[s]["update_skipped"] == 0.0 for s in (1, 2, 4, 5, 6))
    ref = tmp_path / "ref"
    (ref / "checkpoints").mkdir(parents=True)
    shutil.copytree(baseline / "checkpoints" / "step_000002", ref / "checkpoints" / "step_000003")
    state = ref / "checkpoints" / "step_000003" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 3, "num_skipped_total": 1}))
    (ref / "checkpoints" / "latest").write_text("step_000003\n")
    assert launch(tiny(ref), resume=True) == [0, 0]
    assert metrics(ref) == [rows[s] for s in (4, 5, 6)]


def test_consecutive_nans_stop_the_run_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert launch(tiny(out, "run.max_consecutive_skips=2"), fault="loss:3-4:nan") == [EXIT_DIVERGED] * 2
    assert latest(out) == "step_000002"  # step 4 (skipped) was due but not saved
    assert [r["update_skipped"] for r in metrics(out)] == [0.0, 0.0, 1.0, 1.0]
    assert "2 consecutive optimizer steps skipped" in (out / "rank0.log").read_text()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def test_workers_exit_when_their_torchrun_agent_is_killed(tmp_path: Path) -> None:
    """torchrun starts each worker in a session of its own: SIGKILL the agent mid-run and its workers must
    not run on (the parent watchdog); they are gone within a bound far below any collective timeout."""
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "trapo_megatron.commands", "train", "--config", str(CONFIG),
           *tiny(out, "run.max_steps=1000", "checkpoint.save_every=0")]
    with (out / "agent.log").open("w") as log:
        agent = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists():  # the workers are training
            assert agent.poll() is None and time.monotonic() < deadline, (out / "agent.log").read_text()[-3000:]
            time.sleep(1)
        workers += _children(agent.pid)
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        t0 = time.monotonic()
        while any(map(_alive, workers)) and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), f"workers {workers} still running 60 s after their agent died"
    finally:
        for pid in [agent.pid, *filter(_alive, workers)]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("model_type", ["qwen2", "evil"])
def test_a_checkpoint_with_remote_code_never_runs_it(tmp_path: Path, model_type: str) -> None:
    """A model directory whose config points at its own Python code (auto_map): `trapo train`'s checks load
    the config the way the run does; transformers runs remote code only with trust_remote_code=True, which
    nothing in trapo passes. A known model type falls back to the built-in class, an unknown one is refused;
    the code never runs."""
    from trapo_megatron.commands.demo import ASSETS
    from trapo_megatron.train.config import load_config
    from trapo_megatron.train.setup import check_config

    model = tmp_path / "model"
    shutil.copytree(ASSETS / "model", model)
    sentinel = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                   "from transformers import Qwen2Config as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    cfg = load_config(str(CONFIG), [*tiny(tmp_path / "run"), f"model.hf_path={model}"])
    if model_type == "qwen2":
        check_config(cfg, 2)
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            check_config(cfg, 2)
    assert not sentinel.exists()


@pytest.mark.parametrize("override,needle", [
    ("run.stop_signals=[SIGKILL]", "run.stop_signals"), ("run.stop_signals=[SIGTERMM]", "run.stop_signals"),
    ("run.max_consecutive_skips=-1", "run.max_consecutive_skips"),
    ("run.collective_timeout_minutes=0", "run.collective_timeout_minutes"),
])
def test_reliability_knobs_are_checked(tmp_path: Path, override: str, needle: str) -> None:
    from trapo_megatron.config import ConfigError
    from trapo_megatron.train.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(str(CONFIG), [*tiny(tmp_path), override])


def test_repeated_stop_signals_keep_the_first_and_close_restores_the_handlers() -> None:
    """Under a Slurm time limit a rank gets SIGTERM several times (the step, srun and the agent each send it),
    after the USR1 warning or not: the first one names the stop, the rest change nothing."""
    from trapo_megatron.train.stopping import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals(("SIGUSR1", "SIGTERM"))
    try:
        assert stop.received is None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        assert stop.received == "SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before
