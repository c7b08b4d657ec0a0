"""Guide: find unsolved groups, build hinted prompts, merge guided rollouts, and measure hint reliance.

Vocabulary: a *hint* is the guidance text; a rollout sampled with a hint in its context is a *guided rollout*;
a group whose success rate is at or below the threshold is *unsolved*. Shape legend: G groups, T tokens,
S sequences.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch

from guide_mega.algorithms.filtering import has_reward_variance
from guide_mega.metrics import Metrics
from guide_mega.types import Prompt, PromptContent, RolloutGroup

MergeMode = Literal["replace", "pool"]
MERGE_MODES: tuple[str, ...] = ("replace", "pool")
DEFAULT_HINT_TEMPLATE = "{prompt}\nHint: {hint}"


def unsolved_mask(success_rate_G: torch.Tensor, *, threshold: float = 0.0) -> torch.Tensor:
    """Bool [G]: groups whose success rate is <= threshold (threshold 0 means every sample failed)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return success_rate_G <= threshold


def find_unsolved_groups(groups: list[RolloutGroup], *, threshold: float = 0.0) -> list[int]:
    """Indices of the unguided groups whose success rate is <= threshold."""
    rates_G = torch.tensor([group.success_rate for group in groups], dtype=torch.float64)
    mask_G = unsolved_mask(rates_G, threshold=threshold)
    return [index for index, group in enumerate(groups) if mask_G[index] and not group.is_guided]


def hinted_prompt(prompt: Prompt, *, template: str = DEFAULT_HINT_TEMPLATE) -> PromptContent:
    """The prompt with its hint in context.

    A complete `hinted_prompt` from the data wins. Otherwise `template` (with `{prompt}` and `{hint}` fields) is
    applied to the text, or to the content of the last user message of a chat prompt.
    """
    if prompt.hinted_prompt is not None:
        return prompt.hinted_prompt
    if prompt.hint is None:
        raise ValueError(f"prompt {prompt.id!r} has no hint")
    if isinstance(prompt.prompt, str):
        return template.format(prompt=prompt.prompt, hint=prompt.hint)
    messages = copy.deepcopy(prompt.prompt)
    user_turns = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        raise ValueError(f"prompt {prompt.id!r} has no user message to put the hint in")
    last = messages[user_turns[-1]]
    last["content"] = template.format(prompt=last["content"], hint=prompt.hint)
    return messages


@dataclass(frozen=True)
class HintPlan:
    """Which unsolved groups get a second, guided wave, and which cannot (no hint available)."""

    group_indices: list[int]
    prompts: list[PromptContent]
    without_hint: list[int]


def plan_hints(groups: list[RolloutGroup], unsolved: list[int], *, template: str = DEFAULT_HINT_TEMPLATE) -> HintPlan:
    """Hinted prompts for every unsolved group whose prompt has a hint (no world-size rounding, nothing dropped)."""
    indices, prompts, without_hint = [], [], []
    for index in unsolved:
        prompt = groups[index].prompt
        if prompt.has_hint:
            indices.append(index)
            prompts.append(hinted_prompt(prompt, template=template))
        else:
            without_hint.append(index)
    return HintPlan(group_indices=indices, prompts=prompts, without_hint=without_hint)


def _train_under_hint_free_prompt(guided: RolloutGroup, unguided: RolloutGroup) -> RolloutGroup:
    """Guided rollouts keep the hinted prompt they were sampled under and train under the hint-free one."""
    if not unguided.rollouts:
        raise ValueError(f"prompt {unguided.prompt.id!r}: the unguided group is empty, no hint-free context known")
    train_prompt_ids = unguided.rollouts[0].train_prompt_ids
    rollouts = [
        replace(rollout, train_prompt_ids=list(train_prompt_ids), is_guided=True) for rollout in guided.rollouts
    ]
    return RolloutGroup(prompt=unguided.prompt, rollouts=rollouts, is_guided=True)


def _merged_group(unguided: RolloutGroup, guided: RolloutGroup, mode: MergeMode) -> RolloutGroup:
    if guided.prompt.id != unguided.prompt.id:
        raise ValueError(f"guided group for {guided.prompt.id!r} merged into {unguided.prompt.id!r}")
    guided = _train_under_hint_free_prompt(guided, unguided)
    if mode == "pool":
        return RolloutGroup(prompt=unguided.prompt, rollouts=unguided.rollouts + guided.rollouts, is_guided=True)
    return guided


def merge_guided_groups(
    groups: list[RolloutGroup],
    guided: dict[int, RolloutGroup],
    *,
    mode: MergeMode = "replace",
    drop_equal_rewards: bool = False,
) -> tuple[list[RolloutGroup], list[int]]:
    """Merge the second wave into the batch. `guided` maps a group index to its guided group.

    replace: the guided group takes the failed group's place and is normalised on its own (the authors' code).
    pool:    the failed unguided rollouts and the guided ones form one group, so advantages are computed over both.
    Either way every guided rollout trains under the hint-free prompt of its group. With drop_equal_rewards, a
    merged group whose rewards are all equal (no signal) is not merged and the failed group stays; in pool mode
    this looks at the merged group, so an all-correct guided wave beside an all-wrong first wave is kept.
    Returns the merged groups and the indices whose guided group was dropped.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    merged, dropped = list(groups), []
    for index, guided_group in guided.items():
        candidate = _merged_group(groups[index], guided_group, mode)
        if drop_equal_rewards and not has_reward_variance(candidate):
            dropped.append(index)
            continue
        merged[index] = candidate
    return merged, dropped


def hint_reliance(
    hinted_logprobs_T: torch.Tensor, plain_logprobs_T: torch.Tensor, seq_ids_T: torch.Tensor, guided_S: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How much guided samples depend on their hint: log pi(o|q,h) - log pi(o|q), averaged over guided samples.

    hinted_logprobs_T are the response tokens' logprobs under the hinted context, plain_logprobs_T under the
    hint-free one, seq_ids_T each token's sequence, guided_S which sequences are guided. Returns the mean
    sequence-level log-ratio and the mean per-token log-ratio; both 0 with no guided sample.
    """
    diff_T = (hinted_logprobs_T - plain_logprobs_T).detach().to(torch.float64)
    num_seqs = guided_S.numel()
    seq_sum_S = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids_T, diff_T)
    seq_len_S = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids_T, torch.ones_like(diff_T))
    guided_S = guided_S.bool() & (seq_len_S > 0)
    if not guided_S.any():
        zero = torch.zeros((), dtype=torch.float32)
        return {"guide/hint_reliance": zero, "guide/hint_reliance_per_token": zero}
    return {
        "guide/hint_reliance": seq_sum_S[guided_S].mean().float(),
        "guide/hint_reliance_per_token": (seq_sum_S[guided_S] / seq_len_S[guided_S]).mean().float(),
    }


def guide_metrics(
    groups: list[RolloutGroup], unsolved: list[int], plan: HintPlan, guided: dict[int, RolloutGroup], dropped: list[int]
) -> Metrics:
    """Counts for the log (unsolved groups, guided groups, those solved with the hint, those dropped for equal
    rewards) and the guided samples' success rate, weighted by their number."""
    samples = [rollout.correct for group in guided.values() for rollout in group.rollouts]
    counts = {
        "guide/num_groups": len(groups),
        "guide/num_unsolved_groups": len(unsolved),
        "guide/num_unsolved_without_hint": len(plan.without_hint),
        "guide/num_guided_groups": len(guided),
        "guide/guided_groups_solved": sum(group.success_rate > 0 for group in guided.values()),
        "guide/num_guided_groups_dropped": len(dropped),
    }
    success = sum(samples) / len(samples) if samples else 0.0
    return Metrics(counts=counts, means={"guide/guided_success_rate": (success, len(samples))})
