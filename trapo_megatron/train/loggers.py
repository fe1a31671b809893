"""Experiment loggers beside metrics.jsonl: TensorBoard and Weights & Biases, chosen by ``logging.loggers``.

Every sink gets exactly the numbers metrics.jsonl gets, under the same names, at the same step (rank 0
only). W&B is optional: listed in the config but not installed is an error that says how to install it.
Its mode follows ``logging.wandb_mode``, else the WANDB_MODE environment variable (offline runs need no
network; `wandb sync <run dir>/wandb/offline-run-*` uploads them later). A resumed run continues the same
W&B run: its id is kept in <output_dir>/wandb/run_id. W&B drops a step at or below one it already holds, so
the steps a killed run logged after its last checkpoint keep their first values there (equal to the
replayed ones but for the timings: resume is exact); TensorBoard purges and replaces them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

LOGGERS = ("tensorboard", "wandb")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where the per-step metrics go besides metrics.jsonl."""

    loggers: tuple[str, ...] = ("tensorboard",)
    """Any of "tensorboard" (<output_dir>/tensorboard) and "wandb" (needs the wandb package)."""
    wandb_project: str = "trapo"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None: the account's default."""
    wandb_name: str | None = None
    """W&B run name; None: the name of run.output_dir."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode; None: the WANDB_MODE environment variable (or online)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"logging.loggers: unknown {unknown}; choose among {list(LOGGERS)}")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, out_dir: Path, start_step: int = 0) -> None:
        """``start_step``: the step the run resumes after; the events a killed run logged past it are purged
        by TensorBoard's readers (``purge_step``), so each step shows once, as metrics.jsonl keeps it."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, cfg: LoggingConfig, out_dir: Path, run_config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("logging.loggers lists 'wandb' but the wandb package is not installed: "
                             "pip install wandb (or drop it from logging.loggers)") from None
        id_file = out_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                               name=cfg.wandb_name or out_dir.resolve().name, dir=str(out_dir), id=run_id,
                               resume="allow", mode=cfg.wandb_mode, config=run_config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


def build_sinks(cfg: LoggingConfig, out_dir: Path, run_config: dict[str, Any], start_step: int) -> list[Sink]:
    """The configured sinks of a run resuming after ``start_step`` (0: a fresh run); call on rank 0 only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = []
    if "tensorboard" in cfg.loggers:
        sinks.append(TensorBoardSink(out_dir, start_step))
    if "wandb" in cfg.loggers:
        sinks.append(WandbSink(cfg, out_dir, run_config))
    return sinks
