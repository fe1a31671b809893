"""data/, reward/, the schedule and the rollout modules never import megatron, vllm or nemo_run at module
level (vllm only inside the vLLM engine's functions). A static walk: no subprocess, no heavy imports."""

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
