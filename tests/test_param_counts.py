"""Three readers of one ModelSpec count the same parameters per pipeline stage and TP rank: the planner's
formula (plan/model.py), the mapping's tensor shapes (convert/mapping.py) and the builder's real Megatron
model; and a transformers model of each family holds the planner's total."""

from __future__ import annotations

import math

import pytest
from _convert_helpers import hf_model

from trapo_megatron import model_spec
from trapo_megatron.convert import mapping
from trapo_megatron.convert.distribution import Shard
from trapo_megatron.plan.model import PRESETS, stage_params, total_params
from trapo_megatron.testing import run_distributed

FAMILIES = [("qwen2", False), ("llama", True), ("qwen3", False), ("qwen3", True)]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 4), (8, 2)]


def mapping_stage_params(spec: model_spec.ModelSpec, tp: int, pp: int, stage: int) -> int:
    """Elements on one TP rank of ``stage``, from the mapping's Megatron shapes and shards."""
    layers = model_spec.pipeline_stages(spec.num_layers, pp)
    first = sum(layers[:stage])
    total = 0
    for entry, layer in mapping.walk(spec):
        on_stage = (first <= layer < first + layers[stage]) if layer is not None else (
            stage == 0 if entry.mcore.startswith("embedding") else stage == pp - 1)
        if on_stage:
            n = math.prod(mapping.mcore_shape(entry, spec))
            total += n if entry.shard is Shard.REPLICATED else n // tp
    if spec.tied_embeddings and pp > 1 and stage == pp - 1:  # the last stage's copy of the embedding
        total += spec.vocab_size * spec.hidden_size // tp
    return total


@pytest.mark.parametrize("name", PRESETS)
def test_mapping_and_planner_agree_for_every_preset(name: str) -> None:
    spec = PRESETS[name]
    for tp, pp in LAYOUTS:
        try:
            model_spec.check_parallel(spec, tp, pp)
        except ValueError:
            continue
        for stage in range(pp):
            assert stage_params(spec, tp, pp, stage).total == mapping_stage_params(spec, tp, pp, stage), (tp, pp)


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_transformers_model_holds_the_planned_total(family: str, tied: bool) -> None:
    model = hf_model(family, tied)
    spec = model_spec.from_hf_config(model.config)
    assert sum(p.numel() for p in model.parameters()) == total_params(spec)


def _count(rank: int, world: int, layouts: list[tuple[int, int]]) -> list[dict]:
    from types import SimpleNamespace

    from _convert_helpers import hf_config
    from megatron.core import parallel_state as ps

    from trapo_megatron.megatron import model_builder, platform

    out = []
    for tp, pp in layouts:
        parallel = platform.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        platform.initialize(parallel)
        for family, tied in FAMILIES:
            hf = SimpleNamespace(**hf_config(family, tied).to_dict())
            chunks = model_builder.build_model(hf, parallel)
            out.append({"layout": (tp, pp), "family": (family, tied), "stage": ps.get_pipeline_model_parallel_rank(),
                        "params": sum(p.numel() for c in chunks for p in c.parameters())})
    platform.destroy()
    return out


@pytest.mark.timeout(300)
def test_builder_mapping_and_planner_agree_on_a_real_model() -> None:
    from _convert_helpers import hf_config

    for ranks in zip(*run_distributed(_count, 2, [(2, 1), (1, 2)], timeout=280), strict=True):
        for r in ranks:
            (tp, pp), (family, tied) = r["layout"], r["family"]
            spec = model_spec.from_hf_config(hf_config(family, tied))
            planned = stage_params(spec, tp, pp, r["stage"]).total
            assert r["params"] == planned == mapping_stage_params(spec, tp, pp, r["stage"]), r
