"""The final policy as a Hugging Face checkpoint, written by rank 0 from the live weight stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from trapo_megatron import model_spec
from trapo_megatron.megatron import model_builder


def export_hf(policy: Any, hf_config: Any, model_cfg: model_builder.ModelConfig, bucket_mb: int,
              out_dir: Path) -> None:
    """Collective: every rank streams (TP gathers, PP hand-overs); rank 0 writes ``out_dir``."""
    from trapo_megatron.convert import hf_io, mapping

    stream = policy.hf_weights(bucket_mb * 2**20)
    if dist.get_rank() == 0:
        dims = model_spec.from_hf_config(hf_config)
        dtype = model_builder.DTYPES[model_cfg.dtype]
        shapes = mapping.hf_shapes(dims)
        plan = [(h, shapes[h], dtype) for entry in mapping.expanded(dims) for h in entry.hf]
        hf_io.write_checkpoint(out_dir, plan, stream, model_cfg.hf_path, overwrite=True)
    else:
        for _ in stream:  # every rank takes part in the collectives
            pass
    dist.barrier()
