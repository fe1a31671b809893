"""data/, reward/, the schedule and the rollout modules never import megatron, vllm or nemo_run at module
level (vllm only inside the vLLM engine's functions), and the floors below the run never import it. A static
walk: no subprocess, no heavy imports."""

import ast
import pathlib

import trapo_megatron

ROOT = pathlib.Path(trapo_megatron.__file__).parent
FILES = sorted(
    [
        *ROOT.glob("data/*.py"),
        *ROOT.glob("reward/*.py"),
        *ROOT.glob("rollout/*.py"),
        ROOT / "algo" / "micro_groups.py",
    ]
)
FORBIDDEN = {"megatron", "vllm", "nemo_run"}


def _module_level_imports(tree: ast.Module) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                inner._in_function = True  # type: ignore[attr-defined]
    for node in ast.walk(tree):
        if getattr(node, "_in_function", False):
            continue
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_gpu_stack_at_module_level():
    assert len(FILES) >= 10
    bad = {
        str(f.relative_to(ROOT)): sorted(_module_level_imports(ast.parse(f.read_text())) & FORBIDDEN)
        for f in FILES
    }
    assert not {k: v for k, v in bad.items() if v}, bad


def test_vllm_engine_imports_vllm_lazily():
    src = (ROOT / "rollout" / "vllm_engine.py").read_text()
    assert "import vllm" in src and "vllm" not in _module_level_imports(ast.parse(src))


# The floors below the run: they import each other and the package root's neutral modules (faults,
# model_spec, offload_modes, config), never the run (train/, trainer) or the commands above them.
LOWER_FLOORS = ("algo", "convert", "data", "megatron", "reward", "rollout")
COMMANDS = "trapo_megatron.commands"
UPPER = ("trapo_megatron.train", "trapo_megatron.trainer", COMMANDS)


def _trapo_imports(tree: ast.Module) -> set[str]:
    """Every trapo_megatron module a file imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative imports are not used in trapo_megatron"
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in names if n.startswith("trapo_megatron.")}


def _is_under(name: str, parents: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _offenders(files: list[pathlib.Path], parents: tuple[str, ...]) -> dict[str, list[str]]:
    """file -> the modules under ``parents`` it imports, for the files that import any."""
    out = {}
    for f in files:
        hits = sorted(n for n in _trapo_imports(ast.parse(f.read_text())) if _is_under(n, parents))
        if hits:
            out[str(f.relative_to(ROOT))] = hits
    return out


def test_lower_floors_never_import_upward():
    files = sorted(f for floor in LOWER_FLOORS for f in ROOT.glob(f"{floor}/*.py"))
    assert len(files) >= 40
    bad = _offenders(files, UPPER)
    assert not bad, f"a lower floor imports the run or the commands above it: {bad}"


def test_upward_imports_are_seen_in_functions_too():
    src = ("from trapo_megatron.train import faults\n"
           "def f():\n"
           "    from trapo_megatron.commands.train import run_train\n"
           "    import trapo_megatron.trainer\n")
    seen = {n for n in _trapo_imports(ast.parse(src)) if _is_under(n, UPPER)}
    assert seen == {"trapo_megatron.train", "trapo_megatron.train.faults", "trapo_megatron.commands.train",
                    "trapo_megatron.commands.train.run_train", "trapo_megatron.trainer"}


def test_only_entry_points_import_the_commands():
    """The commands are the top floor: outside commands/ only the ``python -m`` entry points import them."""
    files = [f for f in ROOT.rglob("*.py")
             if "commands" not in f.relative_to(ROOT).parts and f.name != "__main__.py"]
    bad = _offenders(files, (COMMANDS,))
    assert not bad, f"imports of the commands package outside it: {bad}"
