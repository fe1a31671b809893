"""Following submitted Slurm jobs to their end, through the same tunnel that submitted them.

NeMo-Run 0.11.1 reads job states from ``sacct`` only (run/torchx_backend/schedulers/slurm.py, describe),
which needs an accounting database; ``scontrol show job`` answers from the controller itself, sees a
requeue as it happens, and keeps a finished job for MinJobAge (300 s by default). So: scontrol while the
controller knows the job, sacct after that. Plain Python (no nemo_run); ``run`` is any callable that runs
a shell command where sbatch runs and returns (exit code, stdout).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

RunCommand = Callable[[str], tuple[int, str]]

# Slurm job states after which a job never runs again (squeue(1) JOB STATE CODES). REQUEUED, PREEMPTED
# with requeue, PENDING and RUNNING are not final: a requeued job comes back under the same id.
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED")

LOG_TAIL_LINES = 60
"""Lines of each log of a failed job echoed to stderr."""


@dataclass
class JobInfo:
    job_id: str
    state: str
    """Slurm state, e.g. RUNNING, COMPLETED, TIMEOUT."""
    exit_code: str = ""
    """Slurm's ExitCode, status:signal (0:0 is success)."""
    restarts: int = 0
    """How many times it was requeued."""
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code in ("0:0", "")


def _scontrol(run: RunCommand, job_id: str) -> JobInfo | None:
    rc, out = run(f"scontrol show job --oneliner {shlex.quote(job_id)}")
    if rc != 0 or "JobState=" not in out:
        return None
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return JobInfo(job_id=job_id, state=fields["JobState"].split("+")[0], exit_code=fields.get("ExitCode", ""),
                   restarts=int(fields.get("Restarts", "0")), reason=fields.get("Reason", ""))


def _sacct(run: RunCommand, job_id: str) -> JobInfo | None:
    rc, out = run(f"sacct --noheader --parsable2 --allocations --jobs {shlex.quote(job_id)} "
                  "--format State,ExitCode,Reason")
    lines = [line for line in out.splitlines() if line.strip()] if rc == 0 else []
    if not lines:
        return None
    state, exit_code, *reason = lines[-1].split("|")
    return JobInfo(job_id=job_id, state=state.split()[0], exit_code=exit_code, reason="|".join(reason))


def job_info(run: RunCommand, job_id: str) -> JobInfo:
    """The job's state now; UNKNOWN when neither the controller nor accounting knows it."""
    return _scontrol(run, job_id) or _sacct(run, job_id) or JobInfo(job_id=job_id, state="UNKNOWN")


def wait(run: RunCommand, job_ids: list[str], poll_s: float = 5.0, say: Callable[[str], None] | None = None,
         ) -> list[JobInfo]:
    """Wait until every job reached a final state (or is unknown); report each state change."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    seen: dict[str, tuple[str, int]] = {}
    while True:
        infos = [job_info(run, job_id) for job_id in job_ids]
        for info in infos:
            if seen.get(info.job_id) != (info.state, info.restarts):
                restarts = f", restart {info.restarts}" if info.restarts else ""
                say(f"trapo launch: job {info.job_id} {info.state}{restarts}")
                seen[info.job_id] = (info.state, info.restarts)
        if all(info.final or info.state == "UNKNOWN" for info in infos):
            return infos
        time.sleep(poll_s)


def tail_logs(run: RunCommand, log_dir: str, job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of every log of ``job_id`` in ``log_dir`` (NeMo-Run names them after the job id)."""
    rc, out = run(f"ls -1 {shlex.quote(log_dir)}")
    names = sorted(n for n in out.split() if job_id in n and n.endswith(".out")) if rc == 0 else []
    chunks = []
    for name in names:
        path = f"{log_dir.rstrip('/')}/{name}"
        _, text = run(f"tail -n {lines} {shlex.quote(path)}")
        chunks.append(f"--- last lines of {path}:\n{text.rstrip()}")
    return "\n".join(chunks)
