"""The rollout stages of a step (DESIGN.md §2): sample groups, score them, Guide's hinted wave.

Each stage takes what it needs and returns its result with its own `Metrics`; `Trainer.step` calls them in the
order of the paper and adds the metrics up. They talk to the engine through the `RolloutEngine` protocol and to
the verifier through `RewardPool`; the Guide decisions themselves live in `algorithms/guide.py`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from guide_mega.algorithms.guide import HintPlan, escalation_plan, level_metrics, plan_hints
from guide_mega.metrics import Metrics
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import RolloutEngine, SamplingParams, request_seed
from guide_mega.types import Prompt, PromptContent, Rollout, RolloutGroup

Tokenize = Callable[[PromptContent], list[int]]


def sample_groups(
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    sampled_prompt_ids: Sequence[list[int]],
    train_prompt_ids: Sequence[list[int]],
    *,
    sampling: SamplingParams,
    group_size: int,
    is_guided: bool,
    wave: str | None = None,
) -> tuple[list[RolloutGroup], Metrics]:
    """G completions per prompt under `sampled_prompt_ids`, recorded to train under `train_prompt_ids`.

    Metrics, under 'guided/' for a hinted wave and 'rollout/' otherwise: generated tokens, rollouts, mean
    response length and the fraction cut at max_new_tokens; and the time spent, as time/rollout_s. With a
    sampling seed, each sample has its own seed from (step seed, prompt id, wave, sample index), so the samples do
    not depend on how requests are batched or spread over engines; `wave` names the wave ('guided' or 'plain' by
    default).
    """
    start = time.perf_counter()
    requests = [ids for ids in sampled_prompt_ids for _ in range(group_size)]
    seeds = None
    if sampling.seed is not None:
        wave = wave or ("guided" if is_guided else "plain")
        seeds = [
            request_seed(sampling.seed, prompt.id, wave, index) for prompt in prompts for index in range(group_size)
        ]
    completions = engine.generate(requests, sampling, seeds=seeds)
    seconds = time.perf_counter() - start
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
    prefix = "guided" if is_guided else "rollout"
    # Which engine made each completion (an engine fleet tags them): every engine should take a share.
    engines = Counter(completion.metadata.get("engine", 0) for completion in completions)
    per_engine = Metrics(counts={f"{prefix}/engine_{engine}_sequences": n for engine, n in engines.items()})
    return groups, _sampling_metrics(groups, prefix, seconds) + per_engine


def _sampling_metrics(groups: list[RolloutGroup], prefix: str, seconds: float) -> Metrics:
    rollouts = [rollout for group in groups for rollout in group.rollouts]
    count = len(rollouts)
    lengths = [len(rollout.response_ids) for rollout in rollouts]
    truncated = sum(rollout.finish_reason == "length" for rollout in rollouts)
    return Metrics(
        counts={f"{prefix}/num_rollouts": count, f"{prefix}/generated_tokens": sum(lengths), "time/rollout_s": seconds},
        means={
            f"{prefix}/response_length_mean": (sum(lengths) / count if count else 0.0, count),
            f"{prefix}/truncated_fraction": (truncated / count if count else 0.0, count),
        },
    )


def first_wave(
    engine: RolloutEngine,
    tokenize: Tokenize,
    prompts: Sequence[Prompt],
    *,
    sampling: SamplingParams,
    group_size: int,
) -> tuple[list[RolloutGroup], Metrics]:
    """G hint-free samples of every prompt, sampled and trained under the same (hint-free) prompt."""
    prompt_ids = [tokenize(prompt.prompt) for prompt in prompts]
    return sample_groups(
        engine, prompts, prompt_ids, prompt_ids, sampling=sampling, group_size=group_size, is_guided=False
    )


def hinted_wave(
    engine: RolloutEngine,
    tokenize: Tokenize,
    groups: list[RolloutGroup],
    plan: HintPlan,
    *,
    sampling: SamplingParams,
    group_size: int,
    wave: str = "guided",
) -> tuple[list[RolloutGroup], Metrics]:
    """One hinted wave: G samples of each planned group's prompt with its hint in context (`plan.prompts`),
    recorded to train under the hint-free prompt. Returns the guided groups in plan order and the sampling metrics."""
    if not plan.group_indices:
        return [], Metrics()
    chosen = [groups[index] for index in plan.group_indices]
    return sample_groups(
        engine,
        [group.prompt for group in chosen],
        [tokenize(content) for content in plan.prompts],
        [group.rollouts[0].train_prompt_ids for group in chosen],
        sampling=sampling,
        group_size=group_size,
        is_guided=True,
        wave=wave,
    )


def guided_waves(
    engine: RolloutEngine,
    tokenize: Tokenize,
    reward_pool: RewardPool,
    groups: list[RolloutGroup],
    unsolved: list[int],
    *,
    template: str,
    levels: Mapping[str, int] | None,
    max_extra_waves: int,
    sampling: SamplingParams,
    group_size: int,
) -> tuple[HintPlan, dict[int, RolloutGroup], Metrics]:
    """Guide's second wave, scored: every unsolved group with a hint is sampled with its hint at its start level
    (`levels`: prompt id -> level; None: the strongest hint). A group whose wave solved nothing and has a stronger
    hint is sampled again one level up, at most `max_extra_waves` times.

    Returns the plan of each group's last wave, the last guided group of each planned group index, and the waves'
    metrics (sampling and scores under 'guided/', per-level counts, guide/num_escalated_groups).
    """
    first = plan_hints(groups, unsolved, template=template, levels=levels)
    plan, last, metrics = first, {}, Metrics()
    for extra in range(max_extra_waves + 1):
        if not plan.group_indices:
            break
        name = "guided" if extra == 0 else f"guided_escalation{extra}"
        waves, sampled = hinted_wave(
            engine, tokenize, groups, plan, sampling=sampling, group_size=group_size, wave=name
        )
        waves, scored = score_groups(waves, reward_pool, prefix="guided")
        escalated = Metrics(counts={"guide/num_escalated_groups": len(waves) if extra else 0})
        metrics += sampled + scored + level_metrics(plan, waves) + escalated
        last |= {index: (wave, prompt, level) for index, wave, prompt, level in zip(
            plan.group_indices, waves, plan.prompts, plan.levels, strict=True)}  # fmt: skip
        plan = escalation_plan(groups, plan, waves, template=template)
    final = HintPlan(
        group_indices=first.group_indices,
        prompts=[last[index][1] for index in first.group_indices],
        without_hint=first.without_hint,
        levels=[last[index][2] for index in first.group_indices],
    )
    return final, {index: last[index][0] for index in first.group_indices}, metrics


def score_groups(
    groups: list[RolloutGroup], reward_pool: RewardPool, *, prefix: str
) -> tuple[list[RolloutGroup], Metrics]:
    """The groups with their rollouts' rewards; the mean reward and accuracy under `prefix`, and time/reward_s."""
    start = time.perf_counter()
    scored, results = reward_pool.score_groups(groups)
    count = len(results)
    reward = sum(result.reward for result in results) / count if count else 0.0
    accuracy = sum(result.correct for result in results) / count if count else 0.0
    means = {f"{prefix}/reward_mean": (reward, count), f"{prefix}/accuracy": (accuracy, count)}
    # A user reward function's extra metrics, each averaged over the responses that reported it.
    for name in sorted({name for result in results for name in result.extras}):
        values = [result.extras[name] for result in results if name in result.extras]
        means[f"{prefix}/reward_extra/{name}"] = (sum(values) / len(values), len(values))
    return scored, Metrics(counts={"time/reward_s": time.perf_counter() - start}, means=means)
