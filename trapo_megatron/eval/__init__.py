"""Evaluation on math benchmarks: avg@k and pass@k graded by math-verify, from local benchmark files.

Generation (CPU twin or vLLM, through the rollout protocol) is kept apart from scoring, so a fixed set of
responses can be scored without a model. Nothing here imports megatron or nemo_run.
"""
