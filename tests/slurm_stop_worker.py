"""A stand-in trainer for the Slurm signal tests (`python -m slurm_stop_worker` under the launch agent): it
catches the stop signals the way train/stopping.py does (a flag), reports once ready, and exits with
EXIT_STOPPED when one came (0 after ``--seconds`` without one)."""

import argparse
import os
import signal
import sys
import time

from trapo_megatron.train.stopping import EXIT_STOPPED

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=180.0)
    args = parser.parse_args()
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum).name))
    rank = os.environ.get("RANK", "?")
    print(f"rank {rank} ready", flush=True)
    deadline = time.monotonic() + args.seconds
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"rank {rank} got {received or 'no signal'}", flush=True)
    sys.exit(EXIT_STOPPED if received else 0)
