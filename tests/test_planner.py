"""`trapo plan` against published model sizes and layouts, and its own bookkeeping identities."""

from __future__ import annotations

import json

import pytest

from trapo_megatron.commands import plan as plan_command
from trapo_megatron.model_spec import from_hf_config
from trapo_megatron.plan.memory import (
    GIB,
    Layout,
    PlanConfig,
    candidate_layouts,
    evaluate,
    plan,
    stage_memory,
)
from trapo_megatron.plan.model import PRESETS, stage_params, total_params

# (preset, parameters the model card states, in billions). Qwen cards: 7.61B, 32.8B, 72.7B; Llama 3.1: 8.03B.
MODEL_CARDS = [("qwen2.5-7b", 7.61), ("qwen3-32b", 32.8), ("qwen2.5-72b", 72.7), ("llama3.1-8b", 8.03)]


@pytest.mark.parametrize("name,billions", MODEL_CARDS)
def test_total_params_match_model_cards(name: str, billions: float) -> None:
    assert total_params(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=5e-3)


def test_qwen25_non_embedding_params_match_card() -> None:
    spec = PRESETS["qwen2.5-7b"]  # card: 6.53B non-embedding
    non_embedding = total_params(spec) - 2 * spec.vocab_size * spec.hidden_size
    assert non_embedding / 1e9 == pytest.approx(6.53, rel=5e-3)


@pytest.mark.parametrize("name", ["tiny", "qwen3-32b", "qwen2.5-72b"])
def test_shards_add_up_to_the_whole_model(name: str) -> None:
    spec = PRESETS[name]
    for lay in candidate_layouts(spec, PlanConfig(num_gpus=32)):
        stages = [stage_params(spec, lay.tp, lay.pp, s) for s in range(lay.pp)]
        # tied embeddings under PP: the last stage holds its own copy of the word embeddings
        copies = spec.vocab_size * spec.hidden_size if spec.tied_embeddings and lay.pp > 1 else 0
        assert sum(st.tp_sharded * lay.tp + st.replicated for st in stages) == total_params(spec) + copies, lay


def _layout_fits(name: str, layout: Layout, **cfg: object) -> bool:
    return evaluate(PRESETS[name], PlanConfig(**cfg), layout) is not None


def test_nemo_rl_qwen3_32b_layout_fits_on_32_h100() -> None:
    """NeMo-RL v0.5 trains Qwen3-32B with Megatron at TP4 x PP4 on 32 H100s (generation TP4)."""
    cfg = {"gpu": "h100-80gb", "num_gpus": 32, "seq_length": 4096, "rollout_tp": 4}
    fit = evaluate(PRESETS["qwen3-32b"], PlanConfig(**cfg), Layout(tp=4, pp=4, dp=2))
    assert fit is not None and not fit.recompute and not fit.tight
    assert fit.max_seq_length >= 8192
    # Pure data parallelism cannot hold 16 bytes/parameter of a 32B model on 80 GB.
    assert not _layout_fits("qwen3-32b", Layout(tp=1, pp=1, dp=32), **cfg)
    ranked = [f.memory.layout for f in plan(PRESETS["qwen3-32b"], PlanConfig(**cfg))]
    assert Layout(tp=4, pp=4, dp=2) in ranked


def test_trapo_paper_7b_fits_one_node() -> None:
    """TRAPO/LUFFY train Qwen2.5-Math-7B on one 8-GPU node, prompts 1024 + responses 8192 tokens."""
    fits = plan(PRESETS["qwen2.5-math-7b"], PlanConfig(num_gpus=8, seq_length=9216))
    assert fits and not fits[0].recompute


def test_72b_needs_more_than_one_node() -> None:
    spec = PRESETS["qwen2.5-72b"]  # 72.7B x 16 bytes of training state = 1.16 TB > 8 x 80 GB
    assert plan(spec, PlanConfig(num_gpus=8)) == []
    assert plan(spec, PlanConfig(num_gpus=32))


def test_distributed_optimizer_divides_states_by_dp() -> None:
    spec, lay = PRESETS["qwen2.5-7b"], Layout(tp=2, pp=1, dp=4)
    sharded = stage_memory(spec, PlanConfig(), lay, 0)
    full = stage_memory(spec, PlanConfig(distributed_optimizer=False), lay, 0)
    assert full.optimizer == sharded.params * 12
    assert sharded.optimizer == -(-full.optimizer // 4)
    assert sharded.weights == sharded.params * 2 and sharded.grads == sharded.params * 4


def test_recompute_lowers_the_peak_and_the_engine_sleeps_while_training() -> None:
    spec, lay = PRESETS["qwen2.5-7b"], Layout(tp=1, pp=1, dp=8)
    m = stage_memory(spec, PlanConfig(seq_length=16384), lay, 0)
    assert m.activations_recompute < m.activations / 10
    assert m.peak(False) == max(m.train(False), m.rollout) < m.train(False) + m.vllm_weights + m.kv_cache


def test_kv_cache_bytes_per_token() -> None:
    spec = PRESETS["qwen3-32b"]  # 64 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 256 KiB per token
    m = stage_memory(spec, PlanConfig(num_gpus=8, rollout_tp=1), Layout(tp=8, pp=1, dp=1), 0)
    assert m.kv_bytes_per_token == 256 * 1024
    m8 = stage_memory(spec, PlanConfig(num_gpus=8), Layout(tp=8, pp=1, dp=1), 0)
    assert m8.kv_bytes_per_token == 32 * 1024


def test_layouts_respect_heads_layers_and_nodes() -> None:
    spec = PRESETS["qwen2.5-7b"]  # 28 heads, 4 KV groups, 28 layers
    lays = candidate_layouts(spec, PlanConfig(num_gpus=16))
    assert all(4 % lay.tp == 0 and 28 % lay.pp == 0 and lay.tp * lay.pp * lay.dp == 16 for lay in lays)
    assert Layout(tp=8, pp=1, dp=2) not in lays


def test_spec_from_hf_config_reads_qwen3_fields() -> None:
    cfg = {"model_type": "qwen3", "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 25600,
           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
           "tie_word_embeddings": False}
    spec = from_hf_config(cfg)
    assert total_params(spec) == total_params(PRESETS["qwen3-32b"])


@pytest.mark.parametrize("field,value", [("num_gpus", 0), ("gpu", "tpu-v9"), ("precision", "fp8")])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        PlanConfig(**{field: value})


def test_plan_of_a_config_without_layers_names_the_field(tmp_path, capsys) -> None:
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "vocab_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert plan_command.main(["--model", str(tmp_path)]) == 2
    assert "num_hidden_layers=None: is missing" in capsys.readouterr().err


def test_cli_prints_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    code = plan_command.main(["--model", "qwen3-32b", "--num-gpus", "32", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "TP4xPP4xDP2" in text and "max_seq" in text
    data = json.loads(out.read_text())
    first = data["layouts"][0]
    assert first["bytes"]["weights"] > 0 and first["train_peak"] < 80 * GIB


def test_cli_nothing_fits_exits_1_and_bad_model_exits_2(capsys) -> None:
    assert plan_command.main(["--model", "qwen2.5-72b", "--num-gpus", "8"]) == 1
    assert plan_command.main(["--model", "no-such-model"]) == 2
    assert "--model" in capsys.readouterr().err


def test_rollout_memory_follows_the_configured_offload() -> None:
    """Nothing is assumed offloaded: the rollout phase holds what engine.offload_during_rollout leaves."""
    spec, lay = PRESETS["qwen2.5-32b"], Layout(tp=4, pp=4, dp=2)
    by_mode = {mode: stage_memory(spec, PlanConfig(num_gpus=32, offload_during_rollout=mode), lay, 0)
               for mode in ("none", "grads", "grads+optimizer")}
    none, grads, both = by_mode["none"], by_mode["grads"], by_mode["grads+optimizer"]
    engine = none.vllm_weights + none.kv_cache
    assert none.rollout == none.weights + none.grads + none.optimizer + engine
    assert grads.rollout == none.rollout - none.grads
    assert both.rollout == none.weights + engine
    assert PlanConfig().offload_during_rollout == "none"
    with pytest.raises(ValueError, match="offload_during_rollout"):
        PlanConfig(offload_during_rollout="all")
