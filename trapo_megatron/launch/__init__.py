"""Launch TRAPO runs with NeMo-Run: local torchrun or Slurm (multi-node torchrun in a container).

Only this package imports nemo_run, and only :mod:`executors` does so at import time; the recipes table and
the CLI glue stay importable without it (`import nemo_run` costs seconds).
"""
