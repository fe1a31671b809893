"""A run's curves (from metrics.jsonl) as one PNG, the way the paper reports them (`trapo plot RUN_DIR`, and
the trainer at the end of a run)."""

from __future__ import annotations

import json
from pathlib import Path

# panel title -> metrics drawn in it
PANELS: dict[str, tuple[str, ...]] = {
    "reward (unguided samples) and held-out accuracy": ("reward_unguided", "heldout_accuracy"),
    "guidance: fraction of prompts guided per micro-group": ("guided_mg2", "guided_mg3", "guided_mg4"),
    "TrSFT: mean p on prefix tokens, fraction p < alpha": ("prefix_p_mean", "prefix_outside_trust_region"),
    "entropy (response tokens)": ("entropy_mean",),
    "response length (unguided samples)": ("response_len_unguided",),
    "train/rollout log-prob gap, clip fraction": ("logprob_gap_mean", "clip_fraction"),
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a trapo run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out`` (default <run_dir>/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, PANELS.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key == "heldout_accuracy" else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"TRAPO run: {run_dir.name}")
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
