"""Per-step metrics: metrics.jsonl + the configured sinks (TensorBoard, W&B: train/loggers.py) on rank 0, and a
progress bar with the key numbers.

Every metric is a plain float; its normalisation is stated where it is computed (trainer.step_metrics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trapo_megatron.train.loggers import Sink, TensorBoardSink

SIGNIFICANT_DIGITS = 9
"""Floats are written with this many significant digits: every fp32 value round-trips, fp64 noise goes, and a
small value (an lr of 1e-6 under decay, a log-prob gap of 1e-7) keeps its digits instead of rounding to 0."""

PROGRESS_KEYS = {"reward_unguided": "r", "heldout_accuracy": "eval", "guided_fraction": "guided",
                 "prefix_p_mean": "p", "entropy_mean": "H"}


class MetricsLogger:
    """Append-only metrics of a run; on resume, rows after the resumed step are dropped first."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 sinks: Callable[[int], list[Sink]] | None = None) -> None:
        """``sinks(start_step)`` builds the experiment loggers (called on the enabled rank only); None:
        TensorBoard."""
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._sinks: list[Sink] = []
        self._bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._sinks = sinks(start_step) if sinks is not None else [TensorBoardSink(out_dir, start_step)]
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="trapo", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to the resumed step (a killed run may have logged later ones, the last possibly
        torn mid-write); rewritten atomically, so a kill here loses nothing."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        if lines and not lines[-1].endswith("}"):
            lines.pop()  # a row cut short by a kill mid-append
        kept = [r for r in map(json.loads, lines) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(f"{v:.{SIGNIFICANT_DIGITS}g}") if isinstance(v, float) else v)
                                for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for sink in self._sinks:
            sink.log(step, numbers)
        if self._bar is not None:
            shown = {short: f"{metrics[k]:.3f}" for k, short in PROGRESS_KEYS.items() if k in metrics}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        if self._bar is not None:
            self._bar.close()
