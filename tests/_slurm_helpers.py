"""`trapo launch --executor slurm` of the tiny config in its own process, as a user runs it, and what the
Slurm tests read back: job ids and final states from its output, metrics from the run directory.

The oracle of every interrupted or multi-node run is an uninterrupted single-node run of the same config:
with fixed seeds on CPU every step's metrics must be equal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parents[1] / "tools" / "slurm" / "cluster.sh"
NUM_STEPS = 40
"""Steps of the reference run (a 1-minute job that must stop early also sleeps in each step: faults.py)."""
RUN = ["run.prompts_per_step=8", "run.progress=false", "evaluation.path=null", "reward.num_workers=1",
       "checkpoint.export_hf=false", "optimizer.lr_schedule=constant"]
"""The tiny config, small and fast; a constant LR and no held-out evaluation make step k's metrics
independent of run.max_steps, so a shorter run is checked against the reference's first steps."""
NOT_COMPARED = re.compile(r"^time_|^tokens_per_s$")
"""Wall-clock metrics differ between any two runs."""


def require_slurm() -> None:
    """Install Slurm when missing (cluster.sh install); skip, with the reason, only where it cannot be
    installed; TRAPO_REQUIRE_SLURM=1 (CI) makes that a failure instead."""
    install = subprocess.run(["bash", str(CLUSTER_SH), "install"], check=False, capture_output=True, text=True,
                             timeout=600)
    if install.returncode != 0:
        reason = f"no Slurm here and it cannot be installed: {install.stderr.strip()}"
        if os.environ.get("TRAPO_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def launch(tmp: Path, *flags: str, overrides: list[str], env: dict[str, str] | None = None,
           executor: str = "slurm", prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`trapo launch` in its own process, its output in tmp/launch.log. ``prefix``: a command it runs under
    (a multi-node cluster's client wrapper, which enters the cluster's network)."""
    log = (tmp / "launch.log").open("w")
    slurm = ["--job-dir", str(tmp / "nemorun")] if executor == "slurm" else []
    cmd = [*prefix, sys.executable, "-m", "trapo_megatron.launch", "--recipe", "tiny-cpu", "--executor", executor,
           *slurm, *flags, "--", *RUN, *overrides]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=env)


def finish(proc: subprocess.Popen, tmp: Path, timeout: float = 800) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (tmp / "launch.log").read_text()


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not NOT_COMPARED.match(k)} for r in rows}


def job_ids(text: str) -> list[str]:
    match = re.search(r"submitted job\(s\) ([\d, ]+)", text)
    assert match, text[-3000:]
    return [j.strip() for j in match.group(1).split(",")]


def ended(text: str, job_id: str) -> str:
    match = re.search(rf"job {job_id} ended (.*)", text)
    assert match, text[-3000:]
    return match.group(1)


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"trapo launch ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def reference_run(tmp: Path) -> dict[int, dict]:
    """The uninterrupted single-node run (the recipe's TP 2 on 2 ranks) of NUM_STEPS steps on the session's
    single-node cluster, followed by `trapo launch` (also the run-to-completion test of that cluster)."""
    run_dir = tmp / "run"
    rc, out = finish(launch(tmp, overrides=[f"run.max_steps={NUM_STEPS}", f"run.output_dir={run_dir}",
                                            "checkpoint.save_every=20"]), tmp)
    assert rc == 0, out[-5000:]
    (job,) = job_ids(out)
    assert ended(out, job).startswith("COMPLETED, exit code 0:0"), out[-3000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000020", f"step_{NUM_STEPS:06d}"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{NUM_STEPS:06d}"
    result = metrics(run_dir)
    assert sorted(result) == list(range(1, NUM_STEPS + 1))  # no held-out evaluation: no step-0 row
    return result
