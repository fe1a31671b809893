"""The planner's parameter and optimizer-state bytes equal those of the real Megatron model it describes.

One spawned world of 2 gloo ranks builds a tiny Qwen2 through the project's model builder, wraps it in
Megatron DDP with the distributed optimizer, takes one Adam step (which creates the states) and counts
bytes, for three layouts in turn: TP2, PP2 and DP2.
"""

from __future__ import annotations

import pytest

from trapo_megatron.model_spec import from_hf_config
from trapo_megatron.plan.memory import optimizer_state_bytes, param_bytes_per_rank
from trapo_megatron.testing import run_distributed

TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
ADAM_STATES = ("exp_avg", "exp_avg_sq")
# (TP, PP, tied embeddings) in a world of 2; TP1 x PP1 is DP2. Tied at PP2: the last stage holds a copy.
LAYOUTS = [(2, 1, False), (1, 2, False), (1, 1, False), (2, 1, True), (1, 2, True)]


def _count_bytes(rank: int, world: int, layouts: list[tuple[int, int, bool]]) -> list[dict]:
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from trapo_megatron.megatron import model_builder, platform, step

    out = []
    for tp, pp, tied in layouts:
        # The builder reads these attributes only; a namespace spares the workers importing transformers.
        hf = SimpleNamespace(**{**TINY, "tie_word_embeddings": tied}, rms_norm_eps=1e-6, hidden_act="silu",
                             rope_parameters={"rope_theta": 1e4})
        parallel = platform.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        platform.initialize(parallel)
        chunks = model_builder.build_model(hf, parallel)
        ddp = step.wrap_ddp(chunks)
        optimizer, _ = step.build_optimizer(ddp, step.OptimizerConfig(lr=1e-3), total_steps=1)
        for chunk in ddp:
            for p in chunk.parameters():
                p.main_grad.zero_()
        with platform.cuda_literals_on_cpu():
            optimizer.step()  # Adam creates exp_avg / exp_avg_sq on the first step
        states = 0
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            for st in opt.optimizer.state.values():
                states += sum(v.numel() * v.element_size() for k, v in st.items() if k in ADAM_STATES)
        out.append({"tp": tp, "pp": pp, "tied": tied, "stage": ps.get_pipeline_model_parallel_rank(),
                        "dp_rank": ps.get_data_parallel_rank(), "states": states,
                        "params": sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())})
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_planner_bytes_equal_megatron_bytes() -> None:
    per_rank = run_distributed(_count_bytes, 2, LAYOUTS, timeout=220)
    for i, (tp, pp, tied) in enumerate(LAYOUTS):
        spec = from_hf_config({**TINY, "tie_word_embeddings": tied}, name="tiny")
        ranks = [r[i] for r in per_rank]
        dp = 2 // (tp * pp)
        for r in ranks:
            assert r["params"] == param_bytes_per_rank(spec, tp, pp, r["stage"], "fp32"), r
        if dp == 1:
            for r in ranks:
                assert r["states"] == optimizer_state_bytes(spec, tp, pp, r["stage"], "fp32"), r
        else:  # the distributed optimizer splits the states over DP: together exact, each about half
            assert sum(r["states"] for r in ranks) == optimizer_state_bytes(spec, tp, pp, 0, "fp32")
            for r in ranks:
                assert abs(r["states"] - optimizer_state_bytes(spec, tp, pp, 0, "fp32") / dp) <= 128 * 8
