"""Reward functions for the RL loop: the shared interface (base), answer checking and the sparse reward."""
from exprl_jax.rewards.answers import AnswerCheck, check_answers, extract_answer, is_equivalent
from exprl_jax.rewards.base import RewardBatch, RewardFn, RewardResult, Span, score_sync
from exprl_jax.rewards.sparse import SparseReward, no_correct_frac

__all__ = [
    "AnswerCheck",
    "RewardBatch",
    "RewardFn",
    "RewardResult",
    "SparseReward",
    "Span",
    "check_answers",
    "extract_answer",
    "is_equivalent",
    "no_correct_frac",
    "score_sync",
]
