"""The fault-injection spec (faults.py): which points, steps and ranks fire, and what a bad spec says."""

from __future__ import annotations

import pytest

from trapo_megatron import faults


def test_sleep_fires_only_at_its_point_steps_and_rank(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv("TRAPO_FAULT", "step_start:2-3:sleep=1.5:1,loss:2:nan")
    monkeypatch.setenv("RANK", "1")
    for step in (1, 2, 3, 4):
        faults.step_begins(step)
        assert faults.fire("step_start") is False
        assert faults.fire("loss") is (step == 2)
    assert slept == [1.5, 1.5]
    monkeypatch.setenv("RANK", "0")
    faults.step_begins(2)
    faults.fire("step_start")
    assert slept == [1.5, 1.5]  # rank 0 is not the fault's rank


@pytest.mark.parametrize("spec", ["step_start:1:sleep", "step_start:1:sleep=0", "step_start:1:sleep=x",
                                  "step_start:1:nap=2", "nowhere:1"])
def test_a_bad_spec_names_itself(monkeypatch, spec: str) -> None:
    monkeypatch.setenv("TRAPO_FAULT", spec)
    with pytest.raises(ValueError, match="TRAPO_FAULT: unknown"):
        faults.fire("step_start")


def test_inert_without_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("TRAPO_FAULT", raising=False)
    assert faults.fire("loss") is False
