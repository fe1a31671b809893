"""The `trapo` command: --help lists the subcommands that exist; `trapo config` documents every field; every
example preset (and every ablation layered on the paper preset) is a valid configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from trapo_megatron.commands import SUBCOMMANDS, main
from trapo_megatron.config import describe
from trapo_megatron.train.config import TrapoConfig, load_config

EXAMPLES = Path(__file__).parents[1] / "examples"
PAPER = EXAMPLES / "qwen2.5-math-7b_trapo.yaml"


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name} " in out, name


def test_every_config_field_is_documented(capsys) -> None:
    undocumented = [key for key, _, _, doc in describe(TrapoConfig) if not doc]
    assert not undocumented, f"config fields without a docstring: {undocumented}"
    assert main(["config"]) == 0
    assert "loss.trsft_alpha" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2.5-math-7b_trapo.yaml"])
def test_standalone_presets_load(name: str) -> None:
    cfg = load_config([str(EXAMPLES / name)], [])
    assert cfg.loss.prefix_objective == "trsft"


@pytest.mark.parametrize("layer", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")
                                         if p.parent.name == "ablations" or p.name in (
                                             "trapo_official.yaml", "qwen2.5-32b_trapo.yaml", "qwen2.5-72b_trapo.yaml")))
def test_layered_presets_load(layer: str) -> None:
    cfg = load_config([str(PAPER), str(EXAMPLES / layer)], [])
    assert cfg.run.output_dir != load_config([str(PAPER)], []).run.output_dir


def test_ablation_switches() -> None:
    grpo = load_config([str(PAPER), str(EXAMPLES / "ablations/grpo.yaml")], [])
    assert grpo.micro_groups.sizes == (8,) and grpo.loss.prefix_objective == "none"
    assert load_config([str(PAPER), str(EXAMPLES / "ablations/mg_luffy.yaml")], []).loss.prefix_objective == "luffy"
    official = load_config([str(PAPER), str(EXAMPLES / "trapo_official.yaml")], [])
    assert official.micro_groups.mode == "official" and official.micro_groups.ratios == (0.0, 0.25, 0.5, 1.0)


def test_train_without_enough_ranks_says_how_to_launch(monkeypatch, capsys) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--config", str(EXAMPLES / "tiny_cpu.yaml")]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_train_config_error_is_one_line(capsys) -> None:
    assert main(["train", "--config", str(EXAMPLES / "tiny_cpu.yaml"), "run.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'run.max_step'" in err and "Traceback" not in err
