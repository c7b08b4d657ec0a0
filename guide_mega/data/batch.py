"""From scored rollout groups to group advantages [S] and the packed `TrainBatch`.

Shape legend: S sequences (rollouts), T response tokens of the batch, G groups.
"""

from __future__ import annotations

import torch

from guide_mega.algorithms.advantages import group_advantages
from guide_mega.config import AlgorithmConfig
from guide_mega.types import RolloutGroup, TrainBatch


def group_rewards(groups: list[RolloutGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [S] (float64) and group index [S] of every rollout, groups in order."""
    rewards_S = torch.tensor([r.reward for g in groups for r in g.rollouts], dtype=torch.float64)
    group_ids_S = torch.tensor([i for i, g in enumerate(groups) for _ in g.rollouts], dtype=torch.int64)
    return rewards_S, group_ids_S


def sequence_advantages(groups: list[RolloutGroup], algorithm: AlgorithmConfig) -> torch.Tensor:
    """Group-relative advantage of every rollout [S] (estimators grpo, dr_grpo and rloo)."""
    if algorithm.estimator == "gae":
        raise ValueError("algorithm.estimator='gae' computes per-token advantages with the critic, not per group")
    rewards_S, group_ids_S = group_rewards(groups)
    return group_advantages(
        rewards_S,
        group_ids_S,
        num_groups=len(groups),
        mode=algorithm.estimator,
        unbiased_std=algorithm.unbiased_std,
        eps=algorithm.std_eps,
        eps_inside_sqrt=algorithm.eps_inside_sqrt,
    )


def build_train_batch(groups: list[RolloutGroup]) -> TrainBatch:
    """Pack the rollouts of `groups` (in order), responses laid end to end."""
    rollouts = [rollout for group in groups for rollout in group.rollouts]
    if not rollouts:
        raise ValueError("cannot build a train batch from no rollouts")
    lengths_S = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.int64)
    cu_seqlens_S1 = torch.zeros(len(rollouts) + 1, dtype=torch.int64)
    cu_seqlens_S1[1:] = lengths_S.cumsum(0)
    have_logprobs = all(r.behaviour_logprobs is not None for r in rollouts)
    _, group_ids_S = group_rewards(groups)
    return TrainBatch(
        train_prompt_ids=[list(r.train_prompt_ids) for r in rollouts],
        sampled_prompt_ids=[list(r.sampled_prompt_ids) for r in rollouts],
        response_ids_T=torch.tensor([t for r in rollouts for t in r.response_ids], dtype=torch.int64),
        cu_seqlens_S1=cu_seqlens_S1,
        is_guided_S=torch.tensor([r.is_guided for r in rollouts], dtype=torch.bool),
        rewards_S=torch.tensor([r.reward for r in rollouts], dtype=torch.float32),
        group_ids_S=group_ids_S,
        hint_level_S=torch.tensor([r.hint_level for r in rollouts], dtype=torch.int64),
        behaviour_logprobs_T=(
            torch.tensor([lp for r in rollouts for lp in r.behaviour_logprobs], dtype=torch.float32)
            if have_logprobs
            else None
        ),
    )
