"""Pre-submit checks of `trapo launch`: each bad input exits 2 with one line naming what to change, before
NeMo-Run is imported or anything is submitted."""

from __future__ import annotations

import pytest

from trapo_megatron.commands import launch as launch_command
from trapo_megatron.launch import checks

SLURM = ["--executor", "slurm", "--container-image", "img", "--mount", "/lustre/data:/data",
         "--mount", "/lustre/runs:/runs", "--dryrun"]
PATHS = ["model.hf_path=/data/model", "data.path=/data/train.jsonl", "run.output_dir=/runs/x"]

BAD_LAUNCHES = [
    # (name, argv, message)
    ("unknown key", ["--recipe", "tiny-cpu", "--dryrun", "--", "run.max_stepz=3"], "unknown key 'run.max_stepz'"),
    ("bad type", ["--recipe", "tiny-cpu", "--dryrun", "--", "run.max_steps=banana"], "run.max_steps: expected int"),
    ("missing config file", ["--config", "no-such.yaml", "--dryrun"], "no-such.yaml: no such file"),
    ("ranks vs TP x PP", ["--recipe", "qwen2.5-32b", *SLURM, "--nodes", "1", "--gpus-per-node", "4", "--", *PATHS],
     "1 node(s) x 4 rank(s) per node = 4 ranks is not a multiple of TP x PP = 4 x 4 = 16"),
    ("prompts vs DP", ["--recipe", "qwen2.5-math-7b", *SLURM, "--", *PATHS, "run.prompts_per_step=6"],
     "run.prompts_per_step=6 does not divide over DP=4"),
    ("memory, --strict", ["--recipe", "qwen2.5-72b", *SLURM, "--nodes", "1", "--strict", "--",
                          "parallel.pipeline_model_parallel_size=1", *PATHS],
     "qwen2.5-72b at TP8 x PP1 x DP1 does not fit a h100-80gb"),
    ("data outside the mounts", ["--recipe", "tiny-cpu", *SLURM, "--", *PATHS, "data.path=/home/me/train.jsonl"],
     "data.path=/home/me/train.jsonl is not under a --mount destination"),
    ("output outside the mounts", ["--recipe", "tiny-cpu", *SLURM, "--", *PATHS[:2]],
     "run.output_dir=/opt/trapo-megatron/runs/demo is not under a --mount destination"),
    ("relative override in a container", ["--recipe", "tiny-cpu", *SLURM, "--", *PATHS, "data.path=train.jsonl"],
     "data.path=train.jsonl is relative: give the path as the container sees it"),
    ("time", ["--recipe", "tiny-cpu", "--executor", "slurm", "--time", "banana", "--dryrun"],
     "--time 'banana' is not a Slurm time"),
    ("signal after the limit", ["--recipe", "tiny-cpu", "--executor", "slurm", "--time", "5", "--dryrun"],
     "--signal 'USR1@300': 300 s before the limit is not inside the 300 s --time"),
    ("signal to the batch shell", ["--recipe", "tiny-cpu", "--executor", "slurm", "--signal", "B:USR1@60", "--dryrun"],
     "give the signal without B:/R:"),
    ("secret in clear", ["--recipe", "tiny-cpu", "--env", "WANDB_API_KEY=abc", "--dryrun"],
     "pass it by name: --env-from-host WANDB_API_KEY"),
    ("secret not set", ["--recipe", "tiny-cpu", "--env-from-host", "TRAPO_NOT_SET_TOKEN", "--dryrun"],
     "--env-from-host TRAPO_NOT_SET_TOKEN: it is not set in this environment"),
    ("relative job dir", ["--recipe", "tiny-cpu", "--executor", "slurm", "--job-dir", "~/jobs", "--dryrun"],
     "--job-dir '~/jobs' must be an absolute path"),
    ("after a non-job", ["--recipe", "tiny-cpu", "--executor", "slurm", "--after", "job7", "--dryrun"],
     "--after 'job7' must be a Slurm job id"),
    ("two dependencies", ["--recipe", "tiny-cpu", "--executor", "slurm", "--after", "7", "--additional-parameter",
                          "dependency=afterok:6", "--dryrun"], "--after and --additional-parameter dependency"),
    ("ssh target", ["--recipe", "tiny-cpu", "--executor", "slurm", "--ssh", "me@login:ssh", "--job-dir", "/jobs",
                    "--dryrun"], "--ssh 'me@login:ssh' must look like USER@HOST or USER@HOST:PORT"),
    ("identity without ssh", ["--recipe", "tiny-cpu", "--executor", "slurm", "--ssh-identity", "/k", "--dryrun"],
     "--ssh-identity needs --ssh"),
    ("ssh without a job dir", ["--recipe", "tiny-cpu", "--executor", "slurm", "--ssh", "me@login", "--dryrun"],
     "--ssh needs --job-dir"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in BAD_LAUNCHES], ids=[c[0] for c in BAD_LAUNCHES])
def test_bad_launch_exits_2_with_the_reason(argv, message, capsys) -> None:
    assert launch_command.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_slurm_time_formats() -> None:
    """sbatch(1)'s formats, in seconds computed by hand."""
    cases = {"90": 5400, "30:15": 1815, "48:00:00": 172800, "2-12": 216000, "1-00:30": 88200,
             "1-02:03:04": 93784}
    assert {t: checks.parse_time(t) for t in cases} == cases
    for bad in ("0", "1:2:3:4", "1h", "-5", ""):
        with pytest.raises(checks.LaunchError, match="--time"):
            checks.parse_time(bad)


def test_signal_parsing() -> None:
    assert checks.parse_signal("USR1@60", 3600) == checks.SlurmSignal(name="SIGUSR1", seconds=60)
    assert checks.parse_signal("SIGTERM@30", 3600).sbatch_value() == "TERM@30"
    assert checks.parse_signal("none", 3600) is None
    for bad in ("KILL@60", "USR1", "USR1@x", "FOO@10"):
        with pytest.raises(checks.LaunchError, match="--signal"):
            checks.parse_signal(bad, 3600)


def test_memory_check_passes_the_recipes_layout_and_names_a_bad_one() -> None:
    from trapo_megatron.plan.model import PRESETS
    from trapo_megatron.train.config import load_config

    files = ["examples/qwen2.5-math-7b_trapo.yaml", "examples/qwen2.5-32b_trapo.yaml"]
    spec = PRESETS["qwen2.5-32b"]
    assert checks.check_memory(load_config(files, []), spec, "h100-80gb", 4, 8) is None  # the recipe's layout
    bad = load_config(files, ["parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=1"])
    warning = checks.check_memory(bad, spec, "h100-80gb", 1, 8)
    assert warning and "qwen2.5-32b at TP8 x PP1 x DP1" in warning


def test_agent_reads_a_graceful_stop_from_the_workers_exit_codes() -> None:
    """torch elastic SIGTERMs the workers still shutting down once the first one exits 75 (seen under Slurm:
    rank 1 exit 75, rank 0 -15): still a stop, after a committed checkpoint. Anything else is a failure."""
    from trapo_megatron.launch.agent import stopped_cleanly

    assert stopped_cleanly({75}) and stopped_cleanly({75, -15})
    assert not stopped_cleanly({-15}) and not stopped_cleanly({75, 1}) and not stopped_cleanly({1})


def test_agent_gives_torchrun_the_node_rank_of_its_own_task(monkeypatch) -> None:
    """On several nodes the job script cannot pass each node its rank ($SLURM_NODEID expands in the batch shell,
    0 everywhere): the agent reads it from its task's environment, and refuses a missing or odd value."""
    import torch.distributed.run

    from trapo_megatron.launch import agent

    seen: list[list[str]] = []
    monkeypatch.setattr(agent, "protect", lambda names: [])  # no signal handlers in the test process
    monkeypatch.setattr(torch.distributed.run, "main", seen.append)
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert agent.main(["--node-rank-from", "SLURM_NODEID", "--nnodes", "2", "-m", "x"]) == 0
    assert seen == [["--node-rank", "1", "--nnodes", "2", "-m", "x"]]
    monkeypatch.setenv("SLURM_NODEID", "n1")
    with pytest.raises(SystemExit):
        agent.main(["--node-rank-from", "SLURM_NODEID", "-m", "x"])
