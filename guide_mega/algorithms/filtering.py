"""Filter-GRPO's group selection: a group whose rewards are all equal has zero advantage everywhere.

Shape legend: G groups.
"""

from __future__ import annotations

from guide_mega.metrics import Metrics
from guide_mega.types import RolloutGroup


def has_reward_variance(group: RolloutGroup) -> bool:
    """Whether the group's rewards differ (a group of equal rewards gives no policy-gradient signal)."""
    rewards = group.rewards
    return len(rewards) > 1 and max(rewards) > min(rewards)


def keep_groups_with_variance(groups: list[RolloutGroup]) -> tuple[list[RolloutGroup], Metrics]:
    """The groups with reward variance, in order, and how many were dropped."""
    kept = [group for group in groups if has_reward_variance(group)]
    return kept, Metrics(counts={"filter/num_groups_dropped": len(groups) - len(kept)})
