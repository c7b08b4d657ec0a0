"""Verifiable rewards: answer extraction, verifiers by name (math, code in a sandbox, multiple choice), and scoring
in a process pool with deadlines."""

from guide_mega.rewards.answers import extract_answer, is_well_formatted
from guide_mega.rewards.pool import DeadlinePool, RewardPool
from guide_mega.rewards.results import RewardOptions, RewardResult
from guide_mega.rewards.sandbox import SandboxLimits, SandboxResult, run_program
from guide_mega.rewards.verifiers import REWARD_FNS, get_reward_fn

__all__ = [
    "REWARD_FNS",
    "DeadlinePool",
    "RewardOptions",
    "RewardPool",
    "RewardResult",
    "SandboxLimits",
    "SandboxResult",
    "extract_answer",
    "get_reward_fn",
    "is_well_formatted",
    "run_program",
]
