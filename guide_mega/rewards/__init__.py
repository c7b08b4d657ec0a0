"""Verifiable rewards: answer extraction, verifiers by name, and scoring in a process pool with deadlines."""

from guide_mega.rewards.answers import extract_answer, is_well_formatted
from guide_mega.rewards.pool import DeadlinePool, RewardPool
from guide_mega.rewards.verifiers import REWARD_FNS, RewardOptions, RewardResult, get_reward_fn

__all__ = [
    "REWARD_FNS",
    "DeadlinePool",
    "RewardOptions",
    "RewardPool",
    "RewardResult",
    "extract_answer",
    "get_reward_fn",
    "is_well_formatted",
]
