"""The metrics log after a resume: each step once, in metrics.jsonl and in TensorBoard (read back with
TensorBoard's own event reader, which applies the purge a resumed writer records)."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trapo_megatron.train.metrics import MetricsLogger


def _run(out: Path, start: int, steps: range, value: float) -> None:
    log = MetricsLogger(out, enabled=True, total_steps=6, start_step=start, progress=False)
    for step in steps:
        log.log(step, {"loss": value + step})
    log.close()


def test_a_resume_replaces_the_steps_a_killed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    _run(tmp_path, 0, range(1, 5), 0.0)  # killed after logging step 4; its last checkpoint is step 2
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss"')  # a row torn by the kill
    _run(tmp_path, 2, range(3, 7), 100.0)  # resumed after step 2, through step 6

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0),
                                                       (6, 106.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], r["loss"]) for r in rows]


def test_small_and_precise_floats_keep_their_significant_digits(tmp_path: Path) -> None:
    import torch

    fp32 = float(torch.tensor(0.1234567891, dtype=torch.float32))  # an all-reduced metric, read back exactly
    values = {"lr": 1e-6 * 0.37, "logprob_gap_mean": 4.2e-7, "reward": 0.125}
    log = MetricsLogger(tmp_path, enabled=True, total_steps=1, start_step=0, progress=False, sinks=lambda s: [])
    log.log(1, {**values, "loss": fp32, "guided": 3})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {k: row[k] for k in values} == values and row["guided"] == 3
    assert float(torch.tensor(row["loss"], dtype=torch.float32)) == fp32 and abs(row["loss"] - fp32) < 1e-9
