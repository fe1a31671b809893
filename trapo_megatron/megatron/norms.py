"""An RMSNorm for megatron-core's LOCAL layer spec that runs under sequence parallelism.

megatron's own local norm (``WrappedTorchNorm``, megatron/core/transformer/torch_norm.py in 0.19.2) asserts
``not config.sequence_parallel``, and that assertion is all that stands in the way: a norm is position-wise,
so on a sequence shard it computes exactly its rows of the full result. Its weight's gradient, however, is
then a partial sum over this rank's rows, which is why the weight is marked ``sequence_parallel``:
finalize_model_grads all-reduces the grads of marked parameters over the TP group
(megatron/core/distributed/finalize_model_grads.py, ``_allreduce_non_tensor_model_parallel_grads``), as it
does for Transformer Engine's norms. With it, the CPU path runs the production (TE) layout: sequence
parallelism on at TP > 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm-builder signature ``(config=, hidden_size=, eps=)``."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def replace_local_norms(spec: Any) -> Any:
    """``spec`` (a ModuleSpec / submodules dataclass tree) with every ``WrappedTorchNorm`` replaced by
    :class:`SequenceParallelRMSNorm`: the layer norms and, where the spec has them, the q/k norms (their grads
    are summed over TP by name in finalize_model_grads, so they need no mark of their own)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelRMSNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=replace_local_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: replace_local_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    return spec
