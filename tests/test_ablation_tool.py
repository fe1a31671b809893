"""tools/ablation.py's quick mode end to end: two real `trapo train` runs at world 1 (4 steps of 2 prompts),
their result records, the table rows and the curves PNG; then a re-run that skips both finished runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "ablation.py"), "--quick", "--out", str(tmp_path / "runs"),
           "--docs", str(tmp_path / "docs")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_quick_ablation_writes_table_and_curves(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and all("4 steps" in line and "held-out" in line for line in progress), progress
    for config in ("grpo", "trapo"):
        result = json.loads((tmp_path / "runs" / "addition" / config / "seed1" / "result.json").read_text())
        assert result["steps"] == 4 and result["seconds"] > 0
        assert [step for step, _ in result["curve"]] == [0, 2, 4]
        assert abs(sum(result["greedy"][k] for k in ("style_a", "style_b", "other")) - 1.0) < 1e-9
    md = (tmp_path / "docs" / "ablation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| config", "| ---"))]
    assert [row.split(" | ")[0] for row in rows] == ["| GRPO", "| TRAPO (+ MG + TrSFT)"]
    assert all(row.split(" | ")[1] == "1" for row in rows)  # one seed each
    assert "`python tools/ablation.py --quick" in md and "4 steps of 2 prompts" in md
    png = (tmp_path / "docs" / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # resumable: a second invocation finds both result records and trains nothing
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(already done)") == 2
