"""`trapo launch` through NeMo-Run: the Slurm sbatch script of the 32B recipe, and local torchrun runs whose
failure makes the launch exit non-zero."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# nemo_run reads NEMORUN_HOME once, at import: point it at a temporary directory first
os.environ["NEMORUN_HOME"] = tempfile.mkdtemp(prefix="trapo-nemorun-")
pytest.importorskip("nemo_run", reason="the launch extra (nemo-run) is not installed")

from trapo_megatron.commands import launch as launch_command

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
    assert launch_command.main(list(argv)) == 0
    return capsys.readouterr().out


GPU_PATHS = ["model.hf_path=/data/model", "data.path=/data/openr1.jsonl", "run.output_dir=/ckpt/run"]


def test_slurm_dryrun_32b(capsys) -> None:
    script = _sbatch(capsys, "--recipe", "qwen2.5-32b", *SLURM, "--", *GPU_PATHS)
    assert script.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=4" in script
    assert "#SBATCH --ntasks-per-node=1" in script  # one torchrun per node ...
    assert "#SBATCH --gpus-per-node=8" in script
    # ... through the stop-signal agent, starting 8 ranks each, rendezvous on the first node, the node rank
    # from each task's own SLURM_NODEID (the script's $SLURM_NODEID would be the batch shell's: 0 everywhere)
    assert re.search(r" python -m trapo_megatron.launch.agent --stop-signal=SIGUSR1 --node-rank-from=SLURM_NODEID "
                     r"--nnodes 4 --nproc-per-node 8 --master-addr \$head_node_ip --master-port 29500 ", script)
    assert "#SBATCH --signal=USR1@300" in script and "#SBATCH --time=48:00:00" in script
    assert "#SBATCH --account=acct" in script and "#SBATCH --partition=batch" in script
    assert f"--container-image {IMAGE}" in script
    assert re.search(r"--container-mounts /lustre/data:/data,/lustre/ckpt:/ckpt", script)
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "HF_HUB_OFFLINE=1", "WANDB_MODE=offline"):
        assert f"export {var}" in script
    assert ("-m trapo_megatron.commands train "
            "--config /opt/trapo-megatron/examples/qwen2.5-math-7b_trapo.yaml "
            "--config /opt/trapo-megatron/examples/qwen2.5-32b_trapo.yaml "
            "parallel.tensor_model_parallel_size=4 parallel.pipeline_model_parallel_size=4 "
            "checkpoint.resume=true model.hf_path=/data/model data.path=/data/openr1.jsonl "
            "run.output_dir=/ckpt/run") in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the script parses as bash


def test_slurm_dryrun_72b_and_single_node_eval(capsys) -> None:
    script = _sbatch(capsys, "--recipe", "qwen2.5-72b", *SLURM, "--", *GPU_PATHS)
    assert "#SBATCH --nodes=8" in script and "--nnodes 8 --nproc-per-node 8" in script
    script = _sbatch(capsys, "--recipe", "qwen2.5-72b", "--task", "eval", *SLURM, "--", "--engine", "vllm")
    assert "#SBATCH --nodes=1" in script and "torchrun" not in script and "launch.agent" not in script
    assert "#SBATCH --signal" not in script  # only the trainer catches the warning; it would kill eval
    assert "python -m trapo_megatron.commands eval --engine vllm" in script


def test_slurm_without_container_runs_this_checkout_with_this_python(capsys, tmp_path) -> None:
    """No image: the job runs this interpreter on this checkout, with absolute paths and no `~` anywhere."""
    script = _sbatch(capsys, "--recipe", "tiny-cpu", "--executor", "slurm", "--job-dir", str(tmp_path), "--dryrun",
                     "--", "run.output_dir=runs/x")
    assert f" {sys.executable} -m trapo_megatron.launch.agent " in script
    assert "#SBATCH --cpus-per-task=2" in script and "--nproc-per-node 2" in script
    assert f"--config {REPO}/examples/tiny_cpu.yaml" in script
    assert f"model.hf_path={REPO}/trapo_megatron/assets/demo/model" in script  # config file: the code dir's
    assert f"run.output_dir={Path.cwd() / 'runs/x'}" in script  # override: the current directory's
    assert f"#SBATCH --output={tmp_path}/experiments/" in script and "~" not in script
    assert "--account" not in script and "--container" not in script


def test_over_ssh_secrets_are_not_looked_up_here(capsys, monkeypatch) -> None:
    """With --ssh the login node's sessions must hold the --env-from-host names (checked there on submission,
    tests/test_launch_slurm.py): one unset on this machine is no error, and the script names it only."""
    monkeypatch.delenv("TRAPO_SET_ON_LOGIN_ONLY", raising=False)
    script = _sbatch(capsys, "--recipe", "tiny-cpu", "--executor", "slurm", "--ssh", "me@login:2222",
                     "--ssh-identity", "/keys/id", "--job-dir", "/jobs", "--env-from-host", "TRAPO_SET_ON_LOGIN_ONLY",
                     "--dryrun")
    assert '[ -n "${TRAPO_SET_ON_LOGIN_ONLY+set}" ] ||' in script and "#SBATCH --export=ALL" in script


def test_cluster_knobs_reach_the_script(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value")
    script = _sbatch(capsys, "--recipe", "qwen2.5-32b", *SLURM, "--qos", "high", "--gres", "gpu:8", "--mem", "0",
                     "--constraint", "h100", "--exclude", "node[01-02]", "--srun-arg=--mpi=pmix",
                     "--container-env", "WANDB_API_KEY", "--additional-parameter", "mail-type=END",
                     "--env-from-host", "WANDB_API_KEY", "--retries", "3", "--signal", "USR1@600",
                     "--time", "2-00:00:00", "--after", "4242", "--", *GPU_PATHS)
    for flag in ("--qos=high", "--gres=gpu:8", "--mem=0", "--constraint=h100", "--exclude='node[01-02]'",
                 "--mail-type=END", "--export=ALL", "--signal=USR1@600", "--time=2-00:00:00",
                 "--dependency=afterany:4242"):
        assert f"#SBATCH {flag}" in script, flag  # nemo-run shell-quotes values
    assert "--mpi=pmix" in script and "--container-env WANDB_API_KEY" in script
    assert "export TORCHX_MAX_RETRIES=3" in script
    assert "s3cr3t-value" not in script  # the secret travels by name only
    assert '[ -n "${WANDB_API_KEY+set}" ] ||' in script  # the job stops at once when it did not arrive


def test_two_cpu_nodes_one_rank_each_and_the_network_knobs_by_name(capsys, monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    script = _sbatch(capsys, "--recipe", "tiny-cpu", "--executor", "slurm", "--nodes", "2", "--nproc-per-node", "1",
                     "--dryrun")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "--nnodes 2 --nproc-per-node 1 --master-addr $head_node_ip" in script
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_IB_HCA"):  # names, never values
        assert f'[ -n "${{{name}+set}}" ] ||' in script
    assert "ib0" not in script and "mlx5_0" not in script and "#SBATCH --export=ALL" in script


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "eval", "--nodes", "2"], "--nodes 2: --task eval runs one process on one node"),
    (["--recipe", "qwen2.5-32b", "--nproc-per-node", "4"], "--nproc-per-node 4: a GPU job runs one rank per GPU"),
    (["--recipe", "tiny-cpu", "--nodes", "3", "--nproc-per-node", "1"],
     "3 node(s) x 1 rank(s) per node = 3 ranks is not a multiple of TP x PP = 2 x 1"),
    (["--recipe", "tiny-cpu", "--nodes", "2", "--nproc-per-node", "1", "--", "engine.tensor_parallel_size=2"],
     "engine.tensor_parallel_size=2 does not divide the 1 rank(s) per node"),
])
def test_nodes_are_checked_against_the_task_and_layout(argv, message, capsys) -> None:
    """Exit 2 before anything is built or submitted, naming the flag or key."""
    cut = argv.index("--") if "--" in argv else len(argv)
    assert launch_command.main([*argv[:cut], "--executor", "slurm", "--dryrun", *argv[cut:]]) == 2
    assert message in capsys.readouterr().err


def test_nemo_run_errors_exit_1(tmp_path, capsys, monkeypatch) -> None:
    """Submitting where sbatch cannot run: NeMo-Run raises, `trapo launch` says so and exits 1."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    argv = ["--recipe", "qwen2.5-32b", *SLURM[:-1], "--job-dir", str(tmp_path), "--detach", "--", *GPU_PATHS]
    assert launch_command.main(argv) == 1
    assert "NeMo-Run failed" in capsys.readouterr().err


def test_recipe_factories_for_nemo_run_scripts() -> None:
    from trapo_megatron.launch.executors import recipe_executor, recipe_task, sbatch_script
    from trapo_megatron.launch.recipes import ClusterSettings

    cluster = ClusterSettings(account="a", container_image=IMAGE)
    task = recipe_task("qwen2.5-72b", args=["optimizer.lr=1e-6"], cluster=cluster)
    assert task.path == "trapo_megatron.launch.agent" and task.m and task.entrypoint == "python"
    i = task.args.index("--config", task.args.index("--config") + 1)
    assert task.args[i:i + 2] == ["--config", "/opt/trapo-megatron/examples/qwen2.5-72b_trapo.yaml"]
    script = sbatch_script(task, recipe_executor("qwen2.5-72b", cluster=cluster), "api")
    assert "#SBATCH --nodes=8" in script and "optimizer.lr=1e-6" in script
    local = recipe_executor("tiny-cpu")
    assert local.ntasks_per_node == 2 and local.env_vars["OMP_NUM_THREADS"] == "1"
    assert recipe_task("tiny-cpu").path == "trapo_megatron.commands"


def test_local_launch_runs_to_completion(capsys) -> None:
    """Two ranks under torchrun on this machine all-reduce over gloo."""
    assert launch_command.main(["--recipe", "tiny-cpu", "--task", "smoke"]) == 0


def test_failed_local_task_fails_the_launch(capsys) -> None:
    assert launch_command.main(["--recipe", "tiny-cpu", "--task", "smoke", "--", "--fail-rank", "1"]) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "failing on purpose" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_launch_tiny_demo_config(tmp_path) -> None:
    """The tiny demo config trains for 2 steps under torchrun (TP=2, gloo) launched by NeMo-Run."""
    overrides = ["run.max_steps=2", "run.prompts_per_step=4", f"run.output_dir={tmp_path / 'run'}",
                 "run.progress=false", "evaluation.every=0", "evaluation.max_problems=8", "reward.num_workers=1"]
    assert launch_command.main(["--recipe", "tiny-cpu", "--", *overrides]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_any_config_launches_with_its_own_layout(capsys, tmp_path) -> None:
    """`--config my.yaml` without a recipe: the config's own TP x PP, TP x PP local processes; on Slurm in a
    container, a config under a mount source is read through the mount."""
    mine = tmp_path / "mine.yaml"
    mine.write_text((REPO / "examples" / "tiny_cpu.yaml").read_text() + "\n")
    out = _sbatch(capsys, "--config", str(mine), "--dryrun", "--", "run.max_steps=3")
    assert f"train --config {mine} checkpoint.resume=true run.max_steps=3" in out
    assert "tensor_model_parallel_size" not in out  # no recipe layout: the file's TP=2 stands
    script = _sbatch(capsys, "--config", str(mine), "--executor", "slurm", "--container-image", IMAGE,
                     "--mount", f"{tmp_path}:/cfg", "--mount", "/lustre/runs:/runs", "--nodes", "2",
                     "--dryrun", "--", "run.output_dir=/runs/mine")
    assert "--config /cfg/mine.yaml" in script and "#SBATCH --nodes=2" in script
    assert "--nnodes 2 --nproc-per-node 8" in script


def test_memory_warning_without_strict(capsys) -> None:
    argv = ["--recipe", "qwen2.5-72b", *SLURM, "--nodes", "1", "--", "parallel.pipeline_model_parallel_size=1",
            *GPU_PATHS]
    assert launch_command.main(argv) == 0  # without --strict the script is still printed ...
    captured = capsys.readouterr()
    assert "#SBATCH --nodes=1" in captured.out
    assert "warning: qwen2.5-72b at TP8 x PP1 x DP1 does not fit" in captured.err  # ... with the warning
