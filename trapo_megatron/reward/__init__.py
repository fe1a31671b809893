"""Rewards: binary math-verify grading in a pool of killable worker processes."""

from trapo_megatron.reward.math_reward import MathRewardPool, RewardConfig, RewardStats, grade, last_boxed

__all__ = ["MathRewardPool", "RewardConfig", "RewardStats", "grade", "last_boxed"]
