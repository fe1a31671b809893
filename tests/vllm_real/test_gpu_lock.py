"""The GPU lock (requirements/gpu-lock.txt, what the image installs) is consistent: it pins vllm 0.33.0, and
every requirement the INSTALLED vllm declares (its wheel METADATA, markers evaluated for this platform)
holds for the lock's pins; this venv is exactly the lock (less Transformer Engine, which needs CUDA to
build). So `uv pip install vllm -c lock` can no longer be unsatisfiable the way the old image was."""

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[2] / "requirements" / "gpu-lock.txt"


def _pins() -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", LOCK.read_text(), flags=re.MULTILINE)
    return {canonicalize_name(n): v for n, v in found}


def _unmet(dist: str, pins: dict[str, str]) -> list[str]:
    bad = []
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            bad.append(f"{line} (lock: {pin})")
    return bad


def test_vllm_is_pinned_and_its_requirements_hold():
    pins = _pins()
    assert pins["vllm"] == "0.33.0" == importlib.metadata.version("vllm")
    assert len(importlib.metadata.requires("vllm")) > 30
    assert _unmet("vllm", pins) == []
    assert _unmet("megatron-core", pins) == []
    assert _unmet("trapo-megatron", pins) == []


def test_this_venv_is_the_lock():
    pins = _pins()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("trapo-megatron")
    wanted = {n: v for n, v in pins.items() if not n.startswith("transformer-engine")}
    assert {n: (installed.get(n), v) for n, v in wanted.items() if installed.get(n) != v} == {}
    assert set(installed) - set(wanted) == set()


def test_the_unmet_check_catches_a_drift():
    pins = {**_pins(), "fastapi": "0.163.2"}  # the old image's pin, via nemo-run's leptonai
    assert any(line.startswith("fastapi") for line in _unmet("vllm", pins))
