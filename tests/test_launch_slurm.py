"""`trapo launch --executor slurm` against a real single-node Slurm cluster (tools/slurm/cluster.sh), no
container: the tiny CPU recipe (torchrun with 2 ranks, TP=2 over gloo) submitted through sbatch/srun from
this machine as the login node. The oracle of every interrupted run is an uninterrupted run of the same
config (conftest.py's slurm_reference): with fixed seeds on CPU every step's metrics must be equal.

Budget: the whole file is a few minutes on 2 cores (the runs are short; a requeued job waits ~14 s).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("nemo_run", reason="the launch extra (nemo-run) is not installed")

pytestmark = [pytest.mark.launch, pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

from _slurm_helpers import NUM_STEPS, ended, finish, job_ids, launch, metrics, wait_for


@pytest.fixture
def reference(slurm_reference) -> dict[int, dict]:
    """The session's uninterrupted single-node run (conftest.py), shared with the multi-node tests."""
    return slurm_reference


def test_slurm_run_completes(reference) -> None:
    """Through real sbatch/srun: every step logged, checkpoints and `latest` in place, job exit code 0."""
    assert all("loss" in reference[step] for step in range(1, NUM_STEPS + 1))


def test_slurm_failed_job_fails_the_launch_with_the_reason(slurm_cluster, tmp_path) -> None:
    missing = tmp_path / "no-such-data.jsonl"
    rc, out = finish(launch(tmp_path, overrides=["run.max_steps=2", f"run.output_dir={tmp_path / 'run'}",
                                                   f"data.path={missing}"]), tmp_path)
    assert rc == 1, out[-3000:]
    (job,) = job_ids(out)
    state = ended(out, job)
    assert state.startswith("FAILED, exit code ") and not state.startswith("FAILED, exit code 0:0"), state
    assert str(missing) in out.split(f"job {job} ended")[1], out[-3000:]  # the trainer's error, in the log tail


def test_scontrol_requeue_restarts_and_resumes_exactly(slurm_cluster, reference, tmp_path) -> None:
    """`scontrol requeue` of the running job after its first checkpoint: it restarts by itself (same job id),
    resumes from the checkpoint, and every step's metrics equal the uninterrupted run's."""
    steps, run_dir = 8, tmp_path / "run"
    proc = launch(tmp_path, overrides=[f"run.max_steps={steps}", f"run.output_dir={run_dir}",
                                        "checkpoint.save_every=2"])
    wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), "the first checkpoint", proc)
    (job,) = job_ids((tmp_path / "launch.log").read_text())
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    rc, out = finish(proc, tmp_path)
    assert rc == 0, out[-5000:]
    assert re.search(rf"job {job} ended COMPLETED, exit code 0:0, 1 restart", out), out[-3000:]
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed[1] == reference[1]  # logged before the requeue, kept by the resumed run
    assert resumed == {k: reference[k] for k in range(1, steps + 1)}


def _times(job_id: str) -> tuple[str, str]:
    """(StartTime, EndTime) of a job the controller still knows (ISO 8601: ordered as strings)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields["StartTime"], fields["EndTime"]


def test_time_limit_signal_checkpoints_and_the_chained_job_finishes(slurm_cluster, reference, tmp_path) -> None:
    """A 1-minute job with the warning signal stops after a step with a checkpoint (exit 75: every rank
    stopped on the signal; the limit's SIGTERM does the same when the warning came too early). A job submitted
    while it runs with ``--after <its id>`` (and no slow steps) waits for it (afterany), resumes and finishes, and
    every step equals the uninterrupted run's.

    The chained job has the recipe's own limit, not a second 1-minute one: Slurm may send the warning up to a
    minute early, i.e. while a 1-minute link is still starting, so each later link of a 1-minute ``--chain``
    advances by one step (seen: 29 steps, then 1); ``--chain`` itself is run in the next test."""
    run_dir = tmp_path / "run"
    overrides = [f"run.max_steps={NUM_STEPS}", f"run.output_dir={run_dir}", "checkpoint.save_every=0"]
    # Each step of the limited job sleeps 4 s (faults.py), so it outlasts its limit however fast the machine: a
    # fast CI machine once ran all 40 steps before Slurm's timer (it checks limits every ~30 s) sent anything.
    slow = f"TRAPO_FAULT=step_start:1-{NUM_STEPS}:sleep=4"
    proc = launch(tmp_path, "--time", "1", "--signal", "USR1@50", "--env", slow, overrides=overrides)
    wait_for(lambda: "submitted job(s)" in (tmp_path / "launch.log").read_text(), "the first job's id", proc)
    (first,) = job_ids((tmp_path / "launch.log").read_text())
    second = tmp_path / "second"
    second.mkdir()
    chained = launch(second, "--after", first, overrides=overrides)  # queued behind the running job
    rc, out = finish(proc, tmp_path)
    assert rc != 0, out[-5000:]  # a stopped job is not a completed one
    assert re.match(r"(FAILED, exit code 75:0|TIMEOUT)", ended(out, first)), ended(out, first)
    logs = Path(tmp_path / "nemorun").rglob(f"log-*_{first}_0.out")
    assert any("every worker stopped on a signal" in p.read_text() for p in logs), "job 1 did not stop on a signal"
    rc, out = finish(chained, second)
    assert rc == 0, out[-5000:]
    (job,) = job_ids(out)
    assert ended(out, job).startswith("COMPLETED, exit code 0:0"), out[-3000:]
    assert _times(job)[0] >= _times(first)[1]  # Slurm held it until the first job had ended
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[0] < saved[1] == f"step_{NUM_STEPS:06d}", saved  # the stop's, the end's
    assert metrics(run_dir) == reference


def test_chain_links_run_one_after_the_other_and_resume(slurm_cluster, reference, tmp_path) -> None:
    """`--chain 2` of a 4-step run: the first link runs it through; the second starts only once the first has
    ended (afterany), resumes from its last checkpoint and finds nothing left to do (no step, no re-export)."""
    run_dir = tmp_path / "run"
    rc, out = finish(launch(tmp_path, "--chain", "2", overrides=[
        "run.max_steps=4", f"run.output_dir={run_dir}", "checkpoint.save_every=2"]), tmp_path)
    assert rc == 0, out[-5000:]
    first, second = job_ids(out)
    for job in (first, second):
        assert ended(out, job).startswith("COMPLETED, exit code 0:0"), out[-3000:]
    assert _times(second)[0] >= _times(first)[1]
    (log,) = Path(tmp_path / "nemorun").rglob(f"log-*_{second}_0.out")
    text = log.read_text()
    assert f"resuming from {run_dir / 'checkpoints' / 'step_000004'} (step 4)" in text, text[-3000:]
    assert "nothing to do" in text, text[-3000:]
    assert metrics(run_dir) == {k: reference[k] for k in range(1, 5)}


@pytest.fixture(scope="module")
def login_node(slurm_cluster):
    """An sshd on 127.0.0.1 in front of the cluster (cluster.sh login-up): its sessions set SLURM_CONF and
    TRAPO_LOGIN_TOKEN, as a login node's profile would; yields (USER@HOST:PORT, private key)."""
    script = Path(__file__).resolve().parents[1] / "tools" / "slurm" / "cluster.sh"
    subprocess.run(["bash", str(script), "login-up", slurm_cluster, "TRAPO_LOGIN_TOKEN=login-secret"], check=True,
                   timeout=60)
    port = (Path(slurm_cluster) / "login" / "port").read_text().strip()
    try:
        yield f"root@127.0.0.1:{port}", str(Path(slurm_cluster) / "login" / "id_ed25519")
    finally:
        subprocess.run(["bash", str(script), "login-down", slurm_cluster], check=True, timeout=60)


def test_ssh_submission_reads_secrets_on_the_login_node(login_node, reference, tmp_path) -> None:
    """`--ssh USER@HOST:PORT --ssh-identity KEY` through NeMo-Run's SSH tunnel (rsync, sbatch, the follow-up
    over ssh). sbatch runs in the login node's session, so `--env-from-host` names are checked THERE before
    anything is submitted (exit 2 when one is missing, even if set here) and the job gets the login node's
    value, which no file of the job holds; the run completes and equals the reference."""
    target, key = login_node
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "local-nemorun"), "TRAPO_ONLY_HERE": "x"}
    env.pop("TRAPO_LOGIN_TOKEN", None)
    ssh = ["--ssh", target, "--ssh-identity", key]
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=2", f"run.output_dir={run_dir}", "checkpoint.save_every=0"]
    rc, out = finish(launch(tmp_path, *ssh, "--env-from-host", "TRAPO_ONLY_HERE", overrides=overrides, env=env),
                      tmp_path)
    assert rc == 2, out[-3000:]
    assert "--env-from-host TRAPO_ONLY_HERE: not set in the sessions of the login node" in out, out[-3000:]
    assert "submitted job" not in out
    rc, out = finish(launch(tmp_path, *ssh, "--env-from-host", "TRAPO_LOGIN_TOKEN", overrides=overrides, env=env),
                      tmp_path)
    assert rc == 0, out[-5000:]
    (job,) = job_ids(out)
    assert ended(out, job).startswith("COMPLETED, exit code 0:0"), out[-3000:]
    job_files = [p for p in (tmp_path / "nemorun").rglob("*") if p.is_file()]
    assert any(p.name.endswith("_sbatch.sh") for p in job_files), job_files  # rsynced to the login node's dir
    assert not any("login-secret" in p.read_text(errors="replace") for p in job_files)
    assert metrics(run_dir) == {k: reference[k] for k in (1, 2)}


def test_time_limit_signal_reaches_the_workers_through_the_agent(slurm_cluster, tmp_path, monkeypatch) -> None:
    """The launcher's side of a time limit, with a stand-in trainer (tests/slurm_stop_worker.py): a 1-minute
    job with --signal USR1@50 under the agent. Slurm's warning (or, when it came before the workers caught
    it, the limit's SIGTERM) reaches both ranks, which exit 75; the agent survives it and exits 75 too.
    Under the limit a worker may get SIGTERM several times (slurmstepd signals every process of the step, srun
    passes it on, the agent forwards it; seen: 4 within 0.1 s): the trainer's handler keeps the first and
    ignores the rest, and so does the stand-in."""
    import io

    from trapo_megatron.launch import executors
    from trapo_megatron.launch.checks import parse_signal

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # invoke (NeMo-Run's shell) reads stdin
    from trapo_megatron.launch.recipes import ClusterSettings, Task, get_recipe

    task = Task(module="slurm_stop_worker", distributed=True, stops_on_signal=True)
    cluster = ClusterSettings(time="1", signal="USR1@50", job_dir=str(tmp_path / "nemorun"),
                              env={"PYTHONPATH": str(Path(__file__).parent)})
    recipe, stop = get_recipe("tiny-cpu"), parse_signal("USR1@50", 60)
    script = executors.slurm_task(task, [], recipe, cluster, stop)
    executor = executors.slurm_executor(task, recipe, cluster, stop)
    assert executors.run_slurm(script, executor, "stop-signal") == 1  # a stopped job is not a completed one
    (log,) = (tmp_path / "nemorun").rglob("log-*_0.out")
    text = log.read_text()
    for rank in (0, 1):  # one or more stop signals, nothing else
        assert re.search(rf"rank {rank} got \['SIG(USR1|TERM)'(, 'SIG(USR1|TERM)')*\]", text), text[-3000:]
    assert "every worker stopped on a signal" in text, text[-3000:]
