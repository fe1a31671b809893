"""tools/gpu_day.sh, the first run on a GPU machine, where a CPU can check it: it names what it lacks
(a CUDA torch, the packages to carry) instead of failing somewhere inside, and the wheels it asks for are the
lock's pins."""

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_day.sh"


def test_without_a_cuda_torch_it_says_what_it_tried(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env={"PATH": "/usr/bin:/bin", "PYTHON": "/bin/false"},
                          capture_output=True, text=True, timeout=60, check=False)
    rows = [json.loads(line) for line in (tmp_path / "gpu_day.jsonl").read_text().splitlines()]
    assert proc.returncode == 1 and rows == [json.loads(proc.stdout)]
    assert rows[0]["name"] == "python" and not rows[0]["ok"]
    assert "no Python with a CUDA torch: tried /bin/false python3 python" in rows[0]["error"]


def test_the_wheels_to_carry_are_the_lock_pins():
    listed = subprocess.run(["bash", str(SCRIPT), "--wheels-list"], capture_output=True, text=True, timeout=30,
                            check=True).stdout.split()
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert "megatron-core==0.19.2" in listed and all(re.match(r"^[a-z0-9.-]+==\S+$", w) for w in listed), listed
    assert all(f"\n{w}" in lock or lock.startswith(w) for w in listed)
