"""Rollouts: the engine protocol, the CPU twin and colocated vLLM engines, and micro-group waves.

``vllm`` is never imported here: the vLLM engine module imports it inside its methods.
"""

from trapo_megatron.rollout.engine import Generation, RolloutEngine, SamplingParams, WeightStream

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "WeightStream"]
