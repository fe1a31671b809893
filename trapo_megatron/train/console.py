"""A rank's library output goes to its log file, so the console shows our progress bar and results only.

`make demo` showed a screen of library warnings around the progress bar (megatron's non-leaf ``.grad``
access, CUDA_DEVICE_MAX_CONNECTIONS, the deprecated async save, ``reduce_scatter_tensor``...): Python
warnings (each once per place, the "default" filter) and logging records of WARNING and above now land in
``rank<N>.log`` of the run directory; torch's and vLLM's own stderr handlers are pointed there too, and the
Hugging Face loading bars (weights, dataset splits) are off. Our messages (``trapo: ...`` on stderr) and our
progress bar stay on the console.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


def library_output_to(log_path: Path) -> None:
    """Route warnings and library logging of this process to ``log_path`` (appended). Call it before the
    libraries are imported: megatron warns at import time."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stream = log_path.open("a", buffering=1)
    warnings.simplefilter("default")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    logging.basicConfig(stream=stream, level=logging.WARNING, force=True)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vllm/logger.py: no handler of its own; records propagate
    for bars in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # transformers, datasets
        os.environ.setdefault(bars, "1")
    import torch  # noqa: F401 - its logging setup (torch/_logging) gives the "torch" logger a stderr handler

    torch_logger = logging.getLogger("torch")
    torch_logger.handlers = [logging.StreamHandler(stream)]
