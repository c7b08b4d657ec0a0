"""Guide: find unsolved groups, build hinted prompts, merge guided rollouts, and measure hint reliance; beyond the
paper, graded hints whose level adapts per problem, and the hint-teacher term (docs/algorithms.md).

Vocabulary: a *hint* is the guidance text; a rollout sampled with a hint in its context is a *guided rollout*;
a group whose success rate is at or below the threshold is *unsolved*; a *hint level* indexes a prompt's graded
hints, weakest first. Shape legend: G groups, T tokens, S sequences, L hint levels, K guided sequences.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch

from guide_mega.algorithms.filtering import has_reward_variance
from guide_mega.metrics import Metrics
from guide_mega.types import Prompt, PromptContent, RolloutGroup

MergeMode = Literal["replace", "pool"]
MERGE_MODES: tuple[str, ...] = ("replace", "pool")
DEFAULT_HINT_TEMPLATE = "{prompt}\nHint: {hint}"
MAX_HINT_LEVELS = 16
"""Hint levels the per-level hint reliance counts: levels 0..15 (a guided sample at a higher level is an error)."""


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


def hinted_prompt(prompt: Prompt, *, template: str = DEFAULT_HINT_TEMPLATE, level: int | None = None) -> PromptContent:
    """The prompt with its hint at `level` (an index into its graded hints, weakest first; None: the strongest).

    A complete `hinted_prompt` from the data wins. Otherwise the prompt's own template, else `template` (with
    `{prompt}` and `{hint}` fields), is applied to the text, or to the content of the last user message of a chat
    prompt.
    """
    if prompt.hinted_prompt is not None:
        return prompt.hinted_prompt
    if not prompt.has_hint:
        raise ValueError(f"prompt {prompt.id!r} has no hint")
    hints = prompt.hint if isinstance(prompt.hint, list) else [prompt.hint]
    if level is not None and not 0 <= level < len(hints):
        raise ValueError(f"prompt {prompt.id!r} has {len(hints)} hint levels, asked for level {level}")
    hint = hints[-1 if level is None else level]
    template = prompt.hint_template or template
    if isinstance(prompt.prompt, str):
        return template.format(prompt=prompt.prompt, hint=hint)
    messages = copy.deepcopy(prompt.prompt)
    user_turns = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        raise ValueError(f"prompt {prompt.id!r} has no user message to put the hint in")
    last = messages[user_turns[-1]]
    last["content"] = template.format(prompt=last["content"], hint=hint)
    return messages


def with_hint_level(prompt: Prompt, level: int) -> Prompt:
    """The prompt as sampled at hint `level`: its hint narrowed to that level's text (a single hint or a complete
    hinted prompt is level 0 and stays as it is)."""
    if not isinstance(prompt.hint, list) or prompt.hinted_prompt is not None:
        return prompt
    return replace(prompt, hint=prompt.hint[level])


@dataclass(frozen=True)
class HintPlan:
    """Which unsolved groups get a guided wave, at which hint level, and which cannot (no hint available)."""

    group_indices: list[int]
    prompts: list[PromptContent]
    without_hint: list[int]
    levels: list[int]
    """The hint level of each planned group (index into its prompt's graded hints, weakest first)."""


def start_level(prompt: Prompt, levels: Mapping[str, int] | None) -> int:
    """The level a prompt's hinted wave starts at: its entry in `levels` (prompt id -> level, 0 when absent) kept
    below its number of hints; with no `levels` (fixed hints) the strongest."""
    strongest = prompt.num_hint_levels - 1
    return strongest if levels is None else min(levels.get(prompt.id, 0), strongest)


def plan_hints(
    groups: list[RolloutGroup],
    unsolved: list[int],
    *,
    template: str = DEFAULT_HINT_TEMPLATE,
    levels: Mapping[str, int] | None = None,
) -> HintPlan:
    """Hinted prompts for every unsolved group whose prompt has a hint (no world-size rounding, nothing dropped), at
    each prompt's `start_level`."""
    indices, prompts, chosen, without_hint = [], [], [], []
    for index in unsolved:
        prompt = groups[index].prompt
        if prompt.has_hint:
            level = start_level(prompt, levels)
            indices.append(index)
            prompts.append(hinted_prompt(prompt, template=template, level=level))
            chosen.append(level)
        else:
            without_hint.append(index)
    return HintPlan(group_indices=indices, prompts=prompts, without_hint=without_hint, levels=chosen)


def escalation_plan(
    groups: list[RolloutGroup], plan: HintPlan, guided: list[RolloutGroup], *, template: str = DEFAULT_HINT_TEMPLATE
) -> HintPlan:
    """The next, stronger hinted wave: the planned groups whose guided wave (`guided`, in plan order) solved
    nothing and whose prompt has a stronger hint, each one level up."""
    indices, prompts, chosen = [], [], []
    for index, level, wave in zip(plan.group_indices, plan.levels, guided, strict=True):
        prompt = groups[index].prompt
        if wave.success_rate == 0.0 and level + 1 < prompt.num_hint_levels:
            indices.append(index)
            prompts.append(hinted_prompt(prompt, template=template, level=level + 1))
            chosen.append(level + 1)
    return HintPlan(group_indices=indices, prompts=prompts, without_hint=[], levels=chosen)


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


def next_hint_level(level: int, *, num_levels: int, guided_success: float, target: float, tolerance: float) -> int:
    """A problem's next start level from its hinted wave's success rate at `level`: up below target - tolerance,
    down above target + tolerance, within [0, num_levels)."""
    if guided_success < target - tolerance:
        return min(level + 1, num_levels - 1)
    if guided_success > target + tolerance:
        return max(level - 1, 0)
    return level


def hint_level_updates(
    groups: list[RolloutGroup],
    unsolved: list[int],
    plan: HintPlan,
    guided: Mapping[int, RolloutGroup],
    *,
    levels: Mapping[str, int],
    target: float,
    tolerance: float,
) -> dict[str, int]:
    """The start levels (prompt id -> level) that change after this step: a problem solved without a hint steps
    down one level, a hinted one moves by `next_hint_level` from the level of its last hinted wave (`plan`,
    `guided`)."""
    unsolved_set = set(unsolved)
    updates = {
        group.prompt.id: levels[group.prompt.id] - 1
        for index, group in enumerate(groups)
        if index not in unsolved_set and levels.get(group.prompt.id, 0) > 0
    }
    for index, level in zip(plan.group_indices, plan.levels, strict=True):
        prompt = groups[index].prompt
        updates[prompt.id] = next_hint_level(
            level,
            num_levels=prompt.num_hint_levels,
            guided_success=guided[index].success_rate,
            target=target,
            tolerance=tolerance,
        )
    return {prompt_id: level for prompt_id, level in updates.items() if level != levels.get(prompt_id, 0)}


def level_metrics(plan: HintPlan, guided: list[RolloutGroup]) -> Metrics:
    """Per hint level of one hinted wave (`guided` in plan order): groups sampled at it (the level histogram) and
    the success rate of its samples."""
    metrics = Metrics()
    for level, group in zip(plan.levels, guided, strict=True):
        metrics += Metrics(
            counts={f"guide/level{level}_groups": 1},
            means={f"guide/level{level}_success_rate": (group.success_rate, len(group.rollouts))},
        )
    return metrics


def trainable_group_yield(groups: list[RolloutGroup], *, generated_tokens: float) -> dict[str, float]:
    """Groups with reward variance (those that train) per 1,000 generated tokens: the yield Guide pays for."""
    trainable = sum(has_reward_variance(group) for group in groups)
    return {"guide/trainable_groups_per_1k_tokens": 1000.0 * trainable / max(generated_tokens, 1.0)}


def hint_reliance(
    hinted_logprobs_T: torch.Tensor, plain_logprobs_T: torch.Tensor, seq_ids_T: torch.Tensor, guided_S: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How much guided samples depend on their hint: log pi(o|q,h) - log pi(o|q), averaged over guided samples.

    hinted_logprobs_T are the response tokens' logprobs under the hinted context, plain_logprobs_T under the
    hint-free one, seq_ids_T each token's sequence, guided_S which sequences are guided. Returns the mean
    sequence-level log-ratio and the mean per-token log-ratio; both 0 with no guided sample.
    """
    seq_sum_S, seq_len_S = _sequence_log_ratios(hinted_logprobs_T, plain_logprobs_T, seq_ids_T, guided_S.numel())
    guided_S = guided_S.bool() & (seq_len_S > 0)
    if not guided_S.any():
        zero = torch.zeros((), dtype=torch.float32)
        return {"guide/hint_reliance": zero, "guide/hint_reliance_per_token": zero}
    return {
        "guide/hint_reliance": seq_sum_S[guided_S].mean().float(),
        "guide/hint_reliance_per_token": (seq_sum_S[guided_S] / seq_len_S[guided_S]).mean().float(),
    }


def hint_reliance_by_level(
    hinted_logprobs_T: torch.Tensor,
    plain_logprobs_T: torch.Tensor,
    seq_ids_T: torch.Tensor,
    hint_level_S: torch.Tensor,
    *,
    num_levels: int = MAX_HINT_LEVELS,
) -> torch.Tensor:
    """Per hint level, the sum of the guided samples' sequence-level log π(o|q,h) - log π(o|q) and their count:
    float64 [num_levels, 2] (sums, counts add up over data-parallel shares; the mean is sum / count).

    hint_level_S is each sequence's level (-1: not guided); sequences without response tokens are left out.
    Raises when a level is not below num_levels."""
    seq_sum_S, seq_len_S = _sequence_log_ratios(hinted_logprobs_T, plain_logprobs_T, seq_ids_T, hint_level_S.numel())
    if hint_level_S.numel() and int(hint_level_S.max()) >= num_levels:
        raise ValueError(f"hint level {int(hint_level_S.max())} is not below the {num_levels} levels counted")
    kept_S = (hint_level_S >= 0) & (seq_len_S > 0)
    levels_K = hint_level_S[kept_S]
    sums_L = torch.zeros(num_levels, dtype=torch.float64).index_add(0, levels_K, seq_sum_S[kept_S])
    counts_L = torch.bincount(levels_K, minlength=num_levels).to(torch.float64)
    return torch.stack([sums_L, counts_L], dim=1)


def _sequence_log_ratios(
    hinted_logprobs_T: torch.Tensor, plain_logprobs_T: torch.Tensor, seq_ids_T: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the sum of log π(o_t|q,h) - log π(o_t|q) over its response tokens and their number: float64
    [S] each."""
    diff_T = (hinted_logprobs_T - plain_logprobs_T).detach().to(torch.float64)
    seq_sum_S = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids_T, diff_T)
    seq_len_S = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq_ids_T, torch.ones_like(diff_T))
    return seq_sum_S, seq_len_S


def hint_teacher_sequences(group_ids_S: torch.Tensor, is_guided_S: torch.Tensor) -> torch.Tensor:
    """For the hint-teacher term: long [S], for each hint-free sequence of a group that also has guided sequences
    (a problem whose hint-free samples failed and that has a hint; merge=pool keeps both in one group) the index of
    a guided sequence of its group, whose sampled (hinted) prompt is the teacher's context; -1 elsewhere."""
    teacher_S = torch.full_like(group_ids_S, -1, dtype=torch.long)
    guided_of_group = {int(group_ids_S[seq]): seq for seq in reversed(range(group_ids_S.numel())) if is_guided_S[seq]}
    for seq in range(group_ids_S.numel()):
        if not is_guided_S[seq]:
            teacher_S[seq] = guided_of_group.get(int(group_ids_S[seq]), -1)
    return teacher_S


def hint_teacher_loss(logprobs_T: torch.Tensor, teacher_logprobs_T: torch.Tensor) -> torch.Tensor:
    """Per-token hint-teacher loss [T]: 1/2 (log pi(o_t|q) - sg[log pi(o_t|q,h)])^2 on the student's own samples.

    Its gradient, (log pi(o_t|q) - log pi(o_t|q,h)) grad log pi(o_t|q), is in expectation over o_t ~ pi(.|q) the
    gradient of the per-token reverse KL(pi(.|q) || pi(.|q,h)) (the term sum_o grad pi(o) vanishes), so only the
    sampled tokens' logprobs are needed, never a full-vocabulary pass. The teacher is detached here.
    """
    return 0.5 * (logprobs_T - teacher_logprobs_T.detach()).square()


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
