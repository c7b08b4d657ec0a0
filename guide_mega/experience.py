"""A step's experience: sample G rollouts per prompt, score them, run Guide's second wave, filter groups.

This is the rollout half of the loop in DESIGN.md §2. It talks to the engine through the `RolloutEngine` protocol
and to the verifier through `RewardPool`; the Guide decisions themselves live in `algorithms/guide.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guide_mega.algorithms.guide import (
    find_unsolved_groups,
    guide_metrics,
    merge_guided_groups,
    plan_hints,
)
from guide_mega.config import AlgorithmConfig
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import RolloutEngine, SamplingParams
from guide_mega.types import Prompt, PromptContent, Rollout, RolloutGroup

Tokenize = Callable[[PromptContent], list[int]]


@dataclass
class Experience:
    """The groups to train on and what happened while collecting them (all counts, nothing dropped silently)."""

    groups: list[RolloutGroup]
    metrics: dict[str, float] = field(default_factory=dict)
    num_generated_tokens: int = 0


def has_reward_variance(group: RolloutGroup) -> bool:
    """Whether the group's rewards differ (a group of equal rewards has zero advantage everywhere)."""
    rewards = group.rewards
    return len(rewards) > 1 and max(rewards) > min(rewards)


def sample_groups(
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    sampled_prompt_ids: Sequence[list[int]],
    train_prompt_ids: Sequence[list[int]],
    *,
    sampling: SamplingParams,
    group_size: int,
    is_guided: bool,
) -> list[RolloutGroup]:
    """G completions per prompt under `sampled_prompt_ids`, recorded to train under `train_prompt_ids`."""
    requests = [ids for ids in sampled_prompt_ids for _ in range(group_size)]
    completions = engine.generate(requests, sampling)
    groups = []
    for index, prompt in enumerate(prompts):
        rollouts = [
            Rollout(
                prompt_id=prompt.id,
                sampled_prompt_ids=list(sampled_prompt_ids[index]),
                train_prompt_ids=list(train_prompt_ids[index]),
                response_ids=completion.response_ids,
                behaviour_logprobs=completion.logprobs,
                response_text=completion.text,
                is_guided=is_guided,
                finish_reason=completion.finish_reason,
            )
            for completion in completions[index * group_size : (index + 1) * group_size]
        ]
        groups.append(RolloutGroup(prompt=prompt, rollouts=rollouts, is_guided=is_guided))
    return groups


def _num_tokens(groups: list[RolloutGroup]) -> int:
    return sum(len(rollout.response_ids) for group in groups for rollout in group.rollouts)


def _rollout_metrics(groups: list[RolloutGroup], prefix: str) -> dict[str, float]:
    rollouts = [rollout for group in groups for rollout in group.rollouts]
    if not rollouts:
        return {}
    lengths = [len(rollout.response_ids) for rollout in rollouts]
    return {
        f"{prefix}/reward_mean": sum(r.reward for r in rollouts) / len(rollouts),
        f"{prefix}/accuracy": sum(r.correct for r in rollouts) / len(rollouts),
        f"{prefix}/response_length_mean": sum(lengths) / len(lengths),
        f"{prefix}/truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        f"{prefix}/num_rollouts": float(len(rollouts)),
    }


class ExperienceCollector:
    """Collects one step's groups: first wave, Guide's hinted second wave, Filter-GRPO's oversampling."""

    def __init__(
        self,
        engine: RolloutEngine,
        reward_pool: RewardPool,
        tokenize: Tokenize,
        *,
        algorithm: AlgorithmConfig,
        sampling: SamplingParams,
        group_size: int,
    ) -> None:
        self.engine, self.reward_pool, self.tokenize = engine, reward_pool, tokenize
        self.algorithm, self.sampling, self.group_size = algorithm, sampling, group_size
        self.generated_tokens = 0
        self.reward_seconds = 0.0

    def _score(self, groups: list[RolloutGroup]) -> None:
        start = time.perf_counter()
        self.reward_pool.score_groups(groups)
        self.reward_seconds += time.perf_counter() - start

    def _first_wave(self, prompts: list[Prompt]) -> list[RolloutGroup]:
        prompt_ids = [self.tokenize(prompt.prompt) for prompt in prompts]
        groups = sample_groups(
            self.engine, prompts, prompt_ids, prompt_ids, sampling=self.sampling, group_size=self.group_size,
            is_guided=False,
        )  # fmt: skip
        self._score(groups)
        self.generated_tokens += _num_tokens(groups)
        return groups

    def _guide(self, groups: list[RolloutGroup], metrics: dict[str, float]) -> list[RolloutGroup]:
        """Second wave for unsolved groups, with the hint in context; merged back into the batch."""
        guide = self.algorithm.guide
        unsolved = find_unsolved_groups(groups, threshold=guide.threshold)
        plan = plan_hints(groups, unsolved, template=guide.hint_template)
        guided: dict[int, RolloutGroup] = {}
        if plan.group_indices:
            chosen = [groups[index] for index in plan.group_indices]
            waves = sample_groups(
                self.engine,
                [group.prompt for group in chosen],
                [self.tokenize(content) for content in plan.prompts],
                [group.rollouts[0].train_prompt_ids for group in chosen],
                sampling=self.sampling,
                group_size=self.group_size,
                is_guided=True,
            )
            self._score(waves)
            self.generated_tokens += _num_tokens(waves)
            metrics.update(_rollout_metrics(waves, "guided"))
            guided = dict(zip(plan.group_indices, waves, strict=True))
        metrics.update(guide_metrics(groups, unsolved, plan, guided))
        if guide.filter_zero_variance:
            kept = {index: group for index, group in guided.items() if has_reward_variance(group)}
            metrics["guide/num_guided_groups_dropped"] = float(len(guided) - len(kept))
            guided = kept
        return merge_guided_groups(groups, guided, mode=guide.merge)

    def collect(self, next_prompts: Callable[[int], list[Prompt]], num_prompts: int) -> Experience:
        """Groups for `num_prompts` prompts; with Filter-GRPO, more rounds until that many groups have variance."""
        experience = Experience(groups=[])
        metrics = experience.metrics
        self.generated_tokens, self.reward_seconds = 0, 0.0
        rounds = 0
        while len(experience.groups) < num_prompts:
            groups = self._first_wave(next_prompts(num_prompts - len(experience.groups)))
            if rounds == 0:
                metrics.update(_rollout_metrics(groups, "rollout"))
            if self.algorithm.guide.enabled:
                groups = self._guide(groups, metrics)
            rounds += 1
            if not self.algorithm.filter_zero_variance:
                experience.groups.extend(groups)
                break
            kept = [group for group in groups if has_reward_variance(group)]
            metrics["filter/num_groups_dropped"] = (
                metrics.get("filter/num_groups_dropped", 0.0) + len(groups) - len(kept)
            )
            experience.groups.extend(kept)
            if rounds >= self.algorithm.max_filter_rounds:
                break
        experience.num_generated_tokens = self.generated_tokens
        metrics["filter/rounds"] = float(rounds)
        metrics["filter/partial_batch"] = float(len(experience.groups) < num_prompts)
        metrics["train/num_groups"] = float(len(experience.groups))
        return experience
