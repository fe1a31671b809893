"""Lint of the Dockerfile and of the shell commands docs/launch.md gives for it (no Docker needed).

Rules (hadolint's spirit, checked in Python): FROM first with a pinned tag (never `latest`); only known
instructions; a pipefail SHELL; every package install pinned (==, a lock/constraint file, a 40-hex commit,
or this repo); apt-get with --no-install-recommends and its lists removed; COPY sources exist; every RUN and
every documented command parses under `bash -n`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOC = REPO / "docs" / "launch.md"
KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "SHELL", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE",
         "USER", "VOLUME", "HEALTHCHECK", "STOPSIGNAL"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            keyword, _, rest = buf.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            buf = ""
    return out


def arg_defaults() -> dict[str, str]:
    out = {}
    for kw, rest in instructions():
        if kw == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value.strip('"')
    return out


def expand(text: str) -> str:
    args = arg_defaults()
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def test_from_first_and_pinned() -> None:
    ins = instructions()
    assert ins[0][0] == "FROM", "the Dockerfile must start with FROM"
    for kw, rest in ins:
        if kw == "FROM":
            image = rest.split()[0]
            assert ":" in image.rsplit("/", 1)[-1], f"FROM {image}: pin a tag"
            assert not image.endswith(":latest"), f"FROM {image}: never latest"


def test_only_known_instructions_and_pipefail_shell() -> None:
    ins = instructions()
    assert {kw for kw, _ in ins} <= KNOWN, {kw for kw, _ in ins} - KNOWN
    shells = [rest for kw, rest in ins if kw == "SHELL"]
    assert shells and "pipefail" in shells[0]
    first = {kw: next(i for i, (k, _) in enumerate(ins) if k == kw) for kw in ("SHELL", "RUN")}
    assert first["SHELL"] < first["RUN"], "SHELL must come before the first RUN"


def _install_specs(command: str) -> list[str]:
    """Package arguments of every `pip install` / `uv pip install` in a RUN command."""
    words = shlex.split(command.replace(";", " ; "))
    commands, current = [], []
    for w in words:
        if w in ("&&", ";", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(w)
    commands.append(current)
    specs = []
    for cmd in commands:
        if "install" not in cmd or "pip" not in cmd[: cmd.index("install")]:
            continue
        tail, skip_next = cmd[cmd.index("install") + 1:], False
        for w in tail:
            if skip_next:
                skip_next = False
            elif w in ("-r", "-c", "--index-url", "--extra-index-url"):
                skip_next = True
            elif not w.startswith("-"):
                specs.append(w)
    return specs


def _unpinned(specs: list[str]) -> list[str]:
    return [s for s in specs if not ("==" in s or s == "." or re.search(r"@[0-9a-f]{40}$", s))]


def test_pin_rule_catches_unpinned_installs() -> None:
    cmd = 'apt-get update && pip install -U "numpy" && uv pip install -r req.txt "x==1" git+https://h/r.git@main'
    assert _unpinned(_install_specs(cmd)) == ["numpy", "git+https://h/r.git@main"]


def test_every_install_is_pinned() -> None:
    runs = [expand(rest) for kw, rest in instructions() if kw == "RUN"]
    specs = [s for r in runs for s in _install_specs(r)]
    assert len(specs) >= 5, f"too few installs found ({specs}): the parser is broken"
    assert _unpinned(specs) == []
    assert re.fullmatch(r"[0-9a-f]{40}", arg_defaults()["APEX_COMMIT"]), "apex must be a pinned commit"
    joined = " ".join(runs)
    assert "requirements/gpu-lock.txt" in joined and "requirements/lock.txt" not in joined


def _lock_pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), flags=re.MULTILINE))


def test_the_image_uses_the_gpu_lock_and_checks_the_te_extension() -> None:
    """The lock holds vllm 0.33.0 with Transformer Engine's torch extension at TE's own version (its full
    consistency with vllm's requirements is checked in tests/vllm_real/test_gpu_lock.py, where vllm is
    installed); the image imports transformer_engine.pytorch (the meta package imports even when the
    extension is broken)."""
    pins = _lock_pins(REPO / "requirements" / "gpu-lock.txt")
    assert pins["vllm"] == "0.33.0" and pins["torch"] == "2.14.0" and pins["megatron-core"] == "0.19.2"
    assert pins["transformer-engine"] == pins["transformer-engine-torch"] == pins["transformer-engine-cu13"]
    cpu = _lock_pins(REPO / "requirements" / "lock.txt")
    assert cpu["torch"] == pins["torch"] and cpu["megatron-core"] == pins["megatron-core"]
    text = DOCKERFILE.read_text()
    assert 'python -c "import transformer_engine.pytorch"' in text
    assert not re.search(r"import [^\n\"]*\btransformer_engine\b(?!\.)", text), "import transformer_engine.pytorch"
    header = (REPO / "requirements" / "gpu-lock.txt").read_text().splitlines()[1]
    makefile = (REPO / "Makefile").read_text().replace("\\\n", "")
    assert " ".join(header.split()[1:]).replace("uv pip compile", "") in " ".join(makefile.split())


def test_apt_hygiene() -> None:
    for kw, rest in instructions():
        if kw == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
            assert "-y" in rest.split()


def test_copy_sources_exist_and_context_is_trimmed() -> None:
    for kw, rest in instructions():
        if kw == "COPY":
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_run_commands_parse_as_bash() -> None:
    for kw, rest in instructions():
        if kw == "RUN":
            r = subprocess.run(["bash", "-n"], input=rest, text=True, capture_output=True, check=False)
            assert r.returncode == 0, f"RUN {rest[:80]}...: {r.stderr}"


def _doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return blocks


def test_documented_commands_parse_and_match_the_image() -> None:
    blocks = _doc_commands()
    assert blocks, "docs/launch.md has no bash blocks"
    for block in blocks:
        r = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True, check=False)
        assert r.returncode == 0, r.stderr
    text = "\n".join(blocks)
    tags = set(re.findall(r"docker build -t (\S+)", text))
    assert tags == {"trapo-megatron:0.1.0"}, tags
    assert "docker run --rm --gpus all --ipc=host trapo-megatron:0.1.0 python -m pytest" in text
    assert f"docker build -t {tags.pop()} ." in DOCKERFILE.read_text(), "the Dockerfile header tells the build"


@pytest.mark.parametrize("flag", ["--recipe", "--executor", "--container-image", "--mount", "--dryrun"])
def test_documented_launch_flags_exist(flag: str) -> None:
    from argparse import ArgumentParser

    from trapo_megatron.commands.launch import add_launch_arguments

    parser = ArgumentParser()
    add_launch_arguments(parser)
    assert flag in parser._option_string_actions
    assert flag in "\n".join(_doc_commands())
