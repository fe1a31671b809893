"""The real-vLLM tests import the suite's helpers (tests/) and this folder's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
