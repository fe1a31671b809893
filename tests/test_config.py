"""The strict config loader: YAML + dotted overrides, errors that name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from trapo_megatron.config import ConfigError, apply_overrides, describe, field_docs, from_dict, load, to_dict


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    """Learning rate."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    sizes: tuple[int, ...] = (4, 2)
    """Micro-group sizes."""
    cap: float | None = None
    """Optional cap."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    """Run name."""
    steps: int = 3
    """Steps."""
    inner: Inner = field(default_factory=Inner)
    """Inner section."""


def test_yaml_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\ninner:\n  lr: 1\n  sizes: [1, 1]\n")
    cfg = load(Outer, p, ["inner.mode=b", "steps=7", "inner.cap=1e-4"])
    assert cfg == Outer(name="demo", steps=7, inner=Inner(lr=1.0, mode="b", sizes=(1, 1), cap=1e-4))
    assert isinstance(cfg.inner.lr, float)
    assert to_dict(cfg)["inner"]["sizes"] == [1, 1]


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"inner": {"lrr": 1}}, "inner.lrr"),
        ({"stepz": 1}, "stepz"),
        ({"steps": "many"}, "steps: expected int"),
        ({"steps": True}, "steps: expected int"),
        ({"inner": {"mode": "c"}}, "inner.mode"),
        ({"inner": {"sizes": [1, "x"]}}, "inner.sizes[1]"),
        ({"inner": {"lr": -1.0}}, "inner: lr must be > 0"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
)
def test_errors_name_the_key(data, needle) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(Outer, data)
    assert needle in str(e.value)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(Outer, tmp_path / "nope.yaml")


def test_field_docs_and_describe() -> None:
    assert field_docs(Inner)["lr"] == "Learning rate."
    rows = {r[0]: r for r in describe(Outer)}
    assert rows["inner.sizes"][2] == (4, 2) and rows["inner.mode"][3] == "Which mode."
