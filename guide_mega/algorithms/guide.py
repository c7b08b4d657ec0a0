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


def merge_guided_groups(
    groups: list[RolloutGroup], guided: dict[int, RolloutGroup], *, mode: MergeMode = "replace"
) -> list[RolloutGroup]:
    """Merge the second wave into the batch. `guided` maps a group index to its guided group.

    replace: the guided group takes the failed group's place and is normalised on its own (the authors' code).
    pool:    the failed unguided rollouts and the guided ones form one group, so advantages are computed over both.
    Either way every guided rollout trains under the hint-free prompt of its group.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    merged = list(groups)
    for index, guided_group in guided.items():
        unguided = groups[index]
        if guided_group.prompt.id != unguided.prompt.id:
            raise ValueError(f"guided group for {guided_group.prompt.id!r} merged into {unguided.prompt.id!r}")
        guided_group = _train_under_hint_free_prompt(guided_group, unguided)
        if mode == "pool":
            guided_group = RolloutGroup(
                prompt=unguided.prompt, rollouts=unguided.rollouts + guided_group.rollouts, is_guided=True
            )
        merged[index] = guided_group
    return merged


def filter_groups_by_success(
    groups: list[RolloutGroup], *, low: float, high: float
) -> tuple[list[RolloutGroup], list[RolloutGroup]]:
    """Split groups into (kept, dropped): kept when low <= success rate <= high (Filter-GRPO's mixed outcomes)."""
    kept = [group for group in groups if low <= group.success_rate <= high]
    dropped = [group for group in groups if not low <= group.success_rate <= high]
    return kept, dropped


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


def guide_metrics(groups: list[RolloutGroup], unsolved: list[int], plan: HintPlan, guided: dict[int, RolloutGroup]):
    """Counts for the log: unsolved groups, guided groups, guided success (any correct sample, and mean)."""
    solved_with_hint = [group.success_rate > 0 for group in guided.values()]
    samples = [rollout.correct for group in guided.values() for rollout in group.rollouts]
    return {
        "guide/num_groups": float(len(groups)),
        "guide/num_unsolved_groups": float(len(unsolved)),
        "guide/num_unsolved_without_hint": float(len(plan.without_hint)),
        "guide/num_guided_groups": float(len(guided)),
        "guide/guided_groups_solved": float(sum(solved_with_hint)),
        "guide/guided_success_rate": sum(samples) / len(samples) if samples else 0.0,
    }
