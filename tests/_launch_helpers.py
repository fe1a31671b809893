"""Real `trapo train` runs for the reliability tests: one OS process per rank, all ranks in ONE process group
of their own (so a fault's ``killpg`` takes down the whole run and nothing else), tiny demo config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from trapo_megatron.commands.demo import CONFIG, _asset_overrides
from trapo_megatron.testing import free_port

VOLATILE = ("time_", "tokens_per_s")
MAX_STEPS = 6


def tiny(out: Path, *extra: str) -> list[str]:
    """A TP=2 run of MAX_STEPS steps (2 prompts x 8 samples, short answers), a checkpoint every 2 steps."""
    return _asset_overrides(str(out)) + [
        f"run.max_steps={MAX_STEPS}", "run.prompts_per_step=2", "run.progress=false", "reward.num_workers=1",
        "rollout.max_response_tokens=24", "evaluation.path=null", "checkpoint.export_hf=false",
        "checkpoint.save_every=2", *extra]


def launch(overrides: list[str], *, resume: bool = False, fault: str = "", world: int = 2,
           timeout: float = 600) -> list[int]:
    """Run `trapo train` on ``world`` ranks to the end; returns every rank's exit status (-9: SIGKILLed)."""
    port = free_port()
    log_dir = Path([o for o in overrides if o.startswith("run.output_dir=")][-1].split("=", 1)[1])
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "TRAPO_FAULT": fault}
        cmd = [sys.executable, "-m", "trapo_megatron.commands", "train", "--config", str(CONFIG),
               *(["--resume"] if resume else []), *overrides]
        with (log_dir / f"rank{rank}.log").open("a") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          process_group=procs[0].pid if procs else 0))
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        try:
            os.killpg(procs[0].pid, signal.SIGKILL)  # leftovers (reward workers) of a run that ended or hung
        except ProcessLookupError:
            pass


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl rows without the timing entries."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()
