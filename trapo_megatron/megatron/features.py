"""Which transformer implementation a run uses, and what follows from it: ONE decision, read by the model
builder (layer spec, fusions, sequence parallelism), the train step (THD attention) and the planner.

| impl  | TE spec | fusions (rope, bias-act, masked softmax, grad-acc) | sequence parallel |
| ----- | ------- | -------------------------------------------------- | ----------------- |
| te    | yes     | on (grad-acc needs apex's fused_weight_gradient_mlp_cuda for the output layer) | TP > 1 |
| local | no      | off (megatron's local spec has no fused kernels on our path) | TP > 1 (our norm: megatron/norms.py) |

Sequence parallelism follows TP on both specs, so the CPU path (local spec) runs the layout a GPU run takes,
and packed rows are padded to a multiple of TP for it (megatron/step.py).

``auto`` is ``te`` on a CUDA machine and ``local`` without CUDA. On CUDA, a Transformer Engine whose torch
extension does not import is an error naming the package and the fix (or ``model.transformer_impl: local``),
never a silent fall-back to the slower spec. Detection imports ``transformer_engine.pytorch``: the
``transformer_engine`` meta package imports even when the extension built against another torch is broken.
No torch import here: the planner reads this on machines without one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

IMPLS = ("auto", "te", "local")


@dataclass(frozen=True)
class Features:
    """The decision (see the module table)."""

    transformer_engine: bool
    """TE layer spec (and THD packed attention)."""
    fusions: bool
    """apply_rope_fusion, bias_activation_fusion, bias_dropout_fusion, masked_softmax_fusion."""
    gradient_accumulation_fusion: bool
    """Weight-gradient GEMMs accumulate into main_grad (TE linears; apex's kernel for the output layer)."""
    sequence_parallel: bool
    reason: str
    """One line: why sequence parallelism is on or off."""


def import_error(module: str) -> str | None:
    """None when ``module`` imports, else the error text (any exception: a broken extension raises OSError
    or RuntimeError, not only ImportError)."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - the cause is returned to the caller, who raises it
        return f"{type(err).__name__}: {err}"
    return None


def decide(impl: str, tp: int, *, cuda: bool, te_error: str | None, grad_accum_kernel: bool) -> Features:
    """The table in the module docstring. ``te_error``: None when ``transformer_engine.pytorch`` imports."""
    if impl not in IMPLS:
        raise ValueError(f"model.transformer_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "te" if cuda else "local"
    if impl == "te":
        if not cuda:
            raise ValueError("model.transformer_impl=te needs a CUDA GPU; use auto or local on CPU")
        if te_error is not None:
            raise RuntimeError(
                f"Transformer Engine is unusable: `import transformer_engine.pytorch` failed ({te_error}). "
                "Install transformer-engine[pytorch] built against this torch (the image's "
                "requirements/gpu-lock.txt pins it), or set model.transformer_impl: local to train on "
                "megatron's local spec (slower: no fusions, no sequence parallelism, dense masks)"
            )
        return Features(True, True, grad_accum_kernel, tp > 1, _sp_reason(tp))
    return Features(False, False, False, tp > 1, _sp_reason(tp))


def _sp_reason(tp: int) -> str:
    return "sequence parallel: on (TP > 1)" if tp > 1 else "sequence parallel: off (TP = 1)"


def detect(impl: str, tp: int) -> Features:
    """:func:`decide` for this machine."""
    import torch

    cuda = torch.cuda.is_available()
    needs_te = impl == "te" or (impl == "auto" and cuda)
    te_error = import_error("transformer_engine.pytorch") if needs_te else "not checked"
    kernel = needs_te and import_error("fused_weight_gradient_mlp_cuda") is None
    return decide(impl, tp, cuda=cuda, te_error=te_error, grad_accum_kernel=kernel)
