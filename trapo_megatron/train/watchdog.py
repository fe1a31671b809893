"""A rank whose launcher died must not run on: torchrun starts each worker in a session of its own, so a
SIGKILLed agent leaves its workers writing into the run directory (and holding the GPUs) until a collective
times out. A daemon thread polls the parent pid; once the process is re-parented it kills itself and,
when it leads its own process group (torchrun's workers do), everything it started (reward workers, engine
processes). Peers that die are caught by the collective timeout (``run.collective_timeout_minutes``).
Not prctl(PR_SET_PDEATHSIG): it fires when the parent THREAD that forked us exits, not the parent process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def _watch(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    print(f"trapo: rank {os.environ.get('RANK', '0')} lost its parent process (pid {parent}, e.g. the torchrun "
          "agent); exiting", file=sys.stderr, flush=True)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(interval_s: float = 1.0) -> threading.Thread:
    """Start the watchdog: this process dies within ``interval_s`` of losing its parent."""
    thread = threading.Thread(target=_watch, args=(os.getppid(), interval_s), name="trapo-parent-watchdog",
                              daemon=True)
    thread.start()
    return thread
