"""`make demo`'s console: a rank's library warnings and logging records go to its log file, each warning once;
our own stderr messages stay on the console. Run in a fresh interpreter (it rewires process-wide state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys, warnings
from pathlib import Path
from trapo_megatron.train.console import library_output_to
library_output_to(Path(sys.argv[1]))
for _ in range(3):
    warnings.warn("library warning", UserWarning)
logging.getLogger("megatron.core.x").warning("library record")
logging.getLogger("torch.y").warning("torch record")
print("trapo: our message", file=sys.stderr)
"""


def test_library_output_goes_to_the_rank_log_once(tmp_path: Path) -> None:
    log = tmp_path / "run" / "rank0.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "trapo: our message\n" and done.stdout == ""
    text = log.read_text()
    assert text.count("library warning") == 1  # three warns from one place: once
    assert "library record" in text and "torch record" in text
