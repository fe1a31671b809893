"""`trapo launch` through NeMo-Run: the Slurm sbatch script of the 32B recipe, and local torchrun runs whose
failure makes the launch exit non-zero."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# nemo_run reads NEMORUN_HOME once, at import: point it at a temporary directory first
os.environ["NEMORUN_HOME"] = tempfile.mkdtemp(prefix="trapo-nemorun-")
pytest.importorskip("nemo_run", reason="the launch extra (nemo-run) is not installed")

from trapo_megatron.launch import cli

pytestmark = [pytest.mark.launch, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/trapo-megatron:0.1.0"
SLURM = ["--executor", "slurm", "--account", "acct", "--partition", "batch", "--container-image", IMAGE,
         "--mount", "/lustre/data:/data", "--mount", "/lustre/ckpt:/ckpt", "--env", "WANDB_MODE=offline",
         "--dryrun"]


@pytest.fixture(autouse=True)
def readable_stdin(monkeypatch):
    # NeMo-Run packages through `invoke`, which reads stdin; pytest's captured stdin refuses reads
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def _sbatch(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_slurm_dryrun_32b(capsys) -> None:
    script = _sbatch(capsys, "--recipe", "qwen2.5-32b", *SLURM, "--", "model.hf_path=/data/Qwen2.5-32B")
    assert script.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=4" in script
    assert "#SBATCH --ntasks-per-node=1" in script  # one torchrun per node ...
    assert "#SBATCH --gpus-per-node=8" in script
    assert re.search(r"torchrun .*--nnodes 4 --nproc-per-node 8", script)  # ... starting 8 ranks each
    assert "#SBATCH --account=acct" in script and "#SBATCH --partition=batch" in script
    assert f"--container-image {IMAGE}" in script
    assert re.search(r"--container-mounts /lustre/data:/data,/lustre/ckpt:/ckpt", script)
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "HF_HUB_OFFLINE=1", "WANDB_MODE=offline"):
        assert f"export {var}" in script
    assert ("-m trapo_megatron.cli train --config /opt/trapo-megatron/examples/qwen2.5-math-7b_trapo.yaml "
            "--config /opt/trapo-megatron/examples/qwen2.5-32b_trapo.yaml "
            "parallel.tensor_model_parallel_size=4 parallel.pipeline_model_parallel_size=4 "
            "model.hf_path=/data/Qwen2.5-32B") in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the script parses as bash


def test_slurm_dryrun_72b_and_single_node_eval(capsys) -> None:
    script = _sbatch(capsys, "--recipe", "qwen2.5-72b", *SLURM)
    assert "#SBATCH --nodes=8" in script and "--nnodes 8 --nproc-per-node 8" in script
    script = _sbatch(capsys, "--recipe", "qwen2.5-72b", "--task", "eval", *SLURM, "--", "--engine", "vllm")
    assert "#SBATCH --nodes=1" in script and "torchrun" not in script
    assert "-m trapo_megatron.cli eval --engine vllm" in script


def test_slurm_needs_account_and_image(capsys) -> None:
    assert cli.main(["--recipe", "qwen2.5-32b", "--executor", "slurm", "--dryrun"]) == 2
    assert "--account" in capsys.readouterr().err


def test_nemo_run_errors_exit_1(tmp_path, capsys) -> None:
    """Submitting where there is no Slurm: NeMo-Run raises, `trapo launch` says so and exits 1."""
    if shutil.which("sbatch"):
        pytest.skip("this machine has sbatch: the job would really be submitted")
    argv = ["--recipe", "qwen2.5-32b", *SLURM[:-1], "--job-dir", str(tmp_path), "--detach"]
    assert cli.main(argv) == 1
    assert "NeMo-Run failed" in capsys.readouterr().err


def test_recipe_factories_for_nemo_run_scripts() -> None:
    from trapo_megatron.launch.executors import recipe_executor, recipe_task, sbatch_script
    from trapo_megatron.launch.recipes import ClusterSettings

    task = recipe_task("qwen2.5-72b", args=["optimizer.lr=1e-6"])
    assert task.path == "trapo_megatron.cli" and task.m and task.entrypoint == "python"
    assert task.args[3:5] == ["--config", "/opt/trapo-megatron/examples/qwen2.5-72b_trapo.yaml"]
    executor = recipe_executor("qwen2.5-72b", cluster=ClusterSettings(account="a", container_image=IMAGE))
    script = sbatch_script(task, executor, "api")
    assert "#SBATCH --nodes=8" in script and "optimizer.lr=1e-6" in script
    local = recipe_executor("tiny-cpu")
    assert local.ntasks_per_node == 2 and local.env_vars["OMP_NUM_THREADS"] == "1"


def test_local_launch_runs_to_completion(capsys) -> None:
    """Two ranks under torchrun on this machine all-reduce over gloo."""
    assert cli.main(["--recipe", "tiny-cpu", "--task", "smoke"]) == 0


def test_failed_local_task_fails_the_launch(capsys) -> None:
    assert cli.main(["--recipe", "tiny-cpu", "--task", "smoke", "--", "--fail-rank", "1"]) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "failing on purpose" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_launch_tiny_demo_config(tmp_path) -> None:
    """The tiny demo config trains for 2 steps under torchrun (TP=2, gloo) launched by NeMo-Run."""
    overrides = ["run.max_steps=2", "run.prompts_per_step=4", f"run.output_dir={tmp_path / 'run'}",
                 "run.progress=false", "evaluation.every=0", "evaluation.max_problems=8", "reward.num_workers=1"]
    assert cli.main(["--recipe", "tiny-cpu", "--", *overrides]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
