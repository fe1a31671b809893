"""Suite-wide settings: offline Hugging Face, a private HF_HOME, quiet warnings from optional GPU stacks."""

import importlib.util
import os
import subprocess
import tempfile

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
    from _slurm_helpers import CLUSTER_SH as script
    from _slurm_helpers import require_slurm

    require_slurm()
    state = tempfile.mkdtemp(prefix="trapo-slurm-")
    previous = os.environ.get("SLURM_CONF")
    try:
        subprocess.run(["bash", str(script), "up", state], check=True, timeout=120)  # a failed `up` is torn down too
        os.environ["SLURM_CONF"] = f"{state}/slurm.conf"
        yield state
    finally:
        subprocess.run(["bash", str(script), "down", state], check=True, timeout=180)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous



@pytest.fixture(scope="session")
def slurm_reference(slurm_cluster, tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted single-node tiny run on the session's cluster (tests/_slurm_helpers.py): the oracle of
    the single- and the multi-node Slurm tests, computed once."""
    from _slurm_helpers import reference_run

    return reference_run(tmp_path_factory.mktemp("reference"))
