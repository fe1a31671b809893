"""Suite-wide settings: offline Hugging Face, a private HF_HOME, quiet warnings from optional GPU stacks."""

import os
import tempfile

# Set at import so spawned workers inherit them too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="trapo-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Strict collectives (trapo_megatron/megatron/platform.py): a host tensor reaching a Megatron group raises.
os.environ["TRAPO_STRICT_COLLECTIVES"] = "1"

# tests/vllm_real needs the real vllm, which lives in its own venv (tools/vllm_venv.sh): `make test` runs it
# there after this suite (and fails loudly when it cannot); here, without vllm, the folder is not collected.
import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_real"]
