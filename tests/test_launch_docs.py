"""Every `trapo launch` command docs/launch.md shows, run as a dry run (they need a GPU cluster): each must
pass the pre-submit checks and print its script. The same commands for real: the tiny CPU ones in
tests/test_launch.py (local torchrun) and tests/test_launch_slurm.py (a real Slurm)."""

from __future__ import annotations

import io
import os
import re
import shlex
import tempfile
from pathlib import Path

import pytest

# nemo_run reads NEMORUN_HOME once, at import: the dry runs write their experiments there
os.environ.setdefault("NEMORUN_HOME", tempfile.mkdtemp(prefix="trapo-nemorun-"))
pytest.importorskip("nemo_run", reason="the launch extra (nemo-run) is not installed")

from trapo_megatron.commands import launch as launch_command

pytestmark = [pytest.mark.launch, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "launch.md"


def _launch_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("trapo launch ")]


COMMANDS = _launch_commands()


def test_the_page_shows_local_slurm_and_config_launches() -> None:
    text = "\n".join(COMMANDS)
    assert len(COMMANDS) >= 6 and "--executor slurm" in text and "--config " in text and "--chain" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_launch_dry_runs(command: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # NeMo-Run packaging reads stdin
    monkeypatch.setenv("WANDB_API_KEY", "doc-test-secret")
    argv = shlex.split(command)[2:]
    cut = argv.index("--") if "--" in argv else len(argv)
    argv = [*argv[:cut], "--dryrun", *argv[cut:]] if "--dryrun" not in argv else argv
    assert launch_command.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert ("#SBATCH" in out) == ("--executor slurm" in command)
    assert "doc-test-secret" not in out
