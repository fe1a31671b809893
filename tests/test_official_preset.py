"""examples/trapo_official.yaml on the paper preset: every official value in place (each with the official
file it comes from), every official knob documented by `trapo config` with that file, and the paper preset
still the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest

from trapo_megatron.config import describe
from trapo_megatron.train.config import TrapoConfig, load_config

EXAMPLES = Path(__file__).parents[1] / "examples"
PAPER = EXAMPLES / "qwen2.5-math-7b_trapo.yaml"

# dotted key -> (official value, where: sh = exp_scripts/train_trapo.sh, ts = luffy/verl/verl/trapo_src/)
OFFICIAL = {
    "run.prompts_per_step": (8, "sh:24"),
    "optimizer.lr": (1e-6, "sh:29"),
    "optimizer.lr_schedule": ("constant", "ts/mix_fsdp_worker.py:234-241, warm-up ratio 0"),
    "optimizer.warmup_steps": (0, "ts/mix_fsdp_worker.py:235-236"),
    "optimizer.clip_grad": (1.0, "ts/config/mix_ppo_trainer.yaml:38"),
    "optimizer.weight_decay": (0.01, "ts/mix_fsdp_worker.py:232"),
    "optimizer.decay_all_parameters": (True, "ts/mix_fsdp_worker.py:229, AdamW(module.parameters())"),
    "optimizer.adam_beta1": (0.9, "ts/mix_fsdp_worker.py:231"),
    "optimizer.adam_beta2": (0.999, "ts/mix_fsdp_worker.py:231"),
    "optimizer.adam_eps": (1e-8, "torch AdamW default"),
    "loss.prefix_objective": ("trsft", "sh:73 off_policy_reshape=clip_low, ts/mix_core_alg.py:235"),
    "loss.trsft_alpha": (0.1, "ts/mix_core_alg.py:235"),
    "loss.aggregation": ("fsdp_sum", "ts/mix_core_alg.py:290-291, sh:76"),
    "loss.reference_world_size": (8, "sh:58"),
    "loss.entropy_coef": (0.001, "sh:52"),
    "loss.entropy_mode": ("official", "ts/mix_actor.py:211,235"),
    "loss.entropy_micro_batch_tokens": (32768, "sh:33-34"),
    "loss.clip_ratio_low": (None, "sh:77"),
    "loss.clip_ratio_high": (None, "sh:77"),
    "loss.advantage": ("drgrpo", "sh:75"),
    "loss.temperature": (1.0, "sh:44"),
    "micro_groups.mode": ("official", "the official micro-group schedule (tests/test_micro_groups.py)"),
    "data.format": ("verl", "data/prepare_train.py"),
    "data.expert_text": ("think", "ts/rl_dataset_with_target.py:194-198"),
    "data.max_prompt_tokens": (1024, "sh:26"),
    "data.max_solution_tokens": (8192, "sh:27"),
    "data.long_solution": ("truncate", "ts/rl_dataset_with_target.py:199-209"),
    "data.order": ("randperm", "ts/rl_dataset_with_target.py:427-461, ts/mix_trainer.py:309-318"),
    "data.order_seed": (47, "ts/rl_dataset_with_target.py:443"),
    "prompt.template": ("raw", "ts/rl_dataset_with_target.py:105-108"),
    "rollout.temperature": (1.0, "sh:44"),
    "rollout.max_response_tokens": (8192, "sh:27"),
    "rollout.reward_special_tokens": (True, "ts/main_mix_ppo.py:103"),
    "reward.mode": ("full", "ts/math_verify_reward.py, sh:78"),
}
# the knobs that exist for the official run only: `trapo config` names the official file for each
OFFICIAL_ONLY = ("optimizer.decay_all_parameters", "loss.reference_world_size", "loss.entropy_mode",
                 "loss.entropy_micro_batch_tokens", "data.long_solution", "data.order", "data.order_seed",
                 "prompt.template", "rollout.reward_special_tokens", "loss.aggregation")


def _get(cfg: TrapoConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture(scope="module")
def configs() -> tuple[TrapoConfig, TrapoConfig]:
    return load_config([str(PAPER)], []), load_config([str(PAPER), str(EXAMPLES / "trapo_official.yaml")], [])


def test_every_official_value_is_in_place(configs) -> None:
    _, official = configs
    wrong = {k: (_get(official, k), v) for k, (v, _) in OFFICIAL.items() if _get(official, k) != v}
    assert not wrong, wrong


def test_official_knobs_name_the_official_file(configs) -> None:
    docs = {key: doc for key, _, _, doc in describe(TrapoConfig)}
    missing = [k for k in OFFICIAL_ONLY
               if "official" not in docs[k] or not ("trapo_src/" in docs[k] or "train_trapo.sh" in docs[k])]
    assert not missing, {k: docs[k] for k in missing}


def test_the_paper_preset_keeps_the_papers_meaning(configs) -> None:
    paper, _ = configs
    assert (paper.loss.aggregation, paper.loss.entropy_coef, paper.loss.entropy_mode) == ("drgrpo", 0.0, "loss_tokens")
    assert (paper.optimizer.lr, paper.optimizer.weight_decay, paper.optimizer.decay_all_parameters) == (5e-6, 0.0, False)
    assert (paper.prompt.template, paper.data.order, paper.data.long_solution) == ("chat", "seeded", "bad_row")
    assert paper.run.prompts_per_step == 128 and not paper.rollout.reward_special_tokens


def test_the_docs_table_names_tests_that_exist() -> None:
    """docs/official.md's test column: every test_*.py[::name] it names is there."""
    import re

    tests = Path(__file__).parent
    named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?", (tests.parent / "docs" / "official.md").read_text())
    assert len(named) >= 14
    for file, name in named:
        assert (tests / file).exists(), file
        assert not name or f"def {name}(" in (tests / file).read_text(), f"{file}::{name}"
