"""The rollout stages of a step (DESIGN.md §2): sample groups, score them, Guide's hinted wave (escalating graded
hints within the step), and the hints the policy writes itself.

Each stage takes what it needs and returns its result with its own `Metrics`; `Trainer.step` calls them in the
order of the paper and adds the metrics up. They talk to the engine through the `RolloutEngine` protocol and to
the verifier through `RewardPool`; the Guide decisions themselves live in `algorithms/guide.py`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from guide_mega.algorithms.filtering import has_reward_variance
from guide_mega.algorithms.guide import HintPlan, escalation_plan, level_metrics, plan_hints, with_hint_level
from guide_mega.data.hints import SELF_HINT_STRENGTHS, accept_self_hint, self_hint_request
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
    hint_levels: Sequence[int] | None = None,
) -> tuple[list[RolloutGroup], Metrics]:
    """G completions per prompt under `sampled_prompt_ids`, recorded to train under `train_prompt_ids`, each
    rollout tagged with its prompt's entry of `hint_levels` (the level of a hinted wave; None: -1, hint-free).

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
                hint_level=-1 if hint_levels is None else hint_levels[index],
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
    recorded to train under the hint-free prompt. Returns the guided groups in plan order, each with its prompt as
    sampled (the hint of its level: what samples.jsonl shows), and the sampling metrics."""
    if not plan.group_indices:
        return [], Metrics()
    chosen = [groups[index] for index in plan.group_indices]
    return sample_groups(
        engine,
        [with_hint_level(group.prompt, level) for group, level in zip(chosen, plan.levels, strict=True)],
        [tokenize(content) for content in plan.prompts],
        [group.rollouts[0].train_prompt_ids for group in chosen],
        sampling=sampling,
        group_size=group_size,
        is_guided=True,
        wave=wave,
        hint_levels=plan.levels,
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
    plan, metrics = first, Metrics()
    guided: dict[int, RolloutGroup] = {}
    prompts: dict[int, PromptContent] = {}
    levels_used: dict[int, int] = {}
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
        guided.update(zip(plan.group_indices, waves, strict=True))
        prompts.update(zip(plan.group_indices, plan.prompts, strict=True))
        levels_used.update(zip(plan.group_indices, plan.levels, strict=True))
        plan = escalation_plan(groups, plan, waves, template=template)
    indices = first.group_indices
    final = HintPlan(
        group_indices=indices,
        prompts=[prompts[index] for index in indices],
        without_hint=first.without_hint,
        levels=[levels_used[index] for index in indices],
    )
    return final, {index: guided[index] for index in indices}, metrics


def self_written_hints(
    engine: RolloutEngine,
    tokenize: Tokenize,
    groups: list[RolloutGroup],
    unsolved: list[int],
    cache: Mapping[tuple[str, int], str | None],
    *,
    sampling: SamplingParams,
    max_new_tokens: int,
) -> tuple[list[RolloutGroup], dict[tuple[str, int], str | None], Metrics]:
    """Hints the policy writes itself (algorithm.guide.hint_source = self) for the unsolved groups whose prompt has
    no hint: one request (`self_hint_request`) per level of SELF_HINT_STRENGTHS not yet in `cache` ((prompt id,
    level) -> hint, None when it was rejected), each written hint leak-checked (`accept_self_hint`).

    Returns the groups with the accepted hints in their prompts as graded hints, weakest first (a problem whose
    hints were all rejected stays without a hint, counted in guide/num_unsolved_without_hint), the new cache
    entries, and metrics under 'self_hint/': written, leaks (and empty hints) rejected, cache hits, generated
    tokens (part of the step's budget); and the time taken, in time/rollout_s.
    """
    start = time.perf_counter()
    indices = [index for index in unsolved if not groups[index].prompt.has_hint]
    wanted = [(index, level) for index in indices for level in range(len(SELF_HINT_STRENGTHS))]
    todo = [(index, level) for index, level in wanted if (groups[index].prompt.id, level) not in cache]
    seeds = None
    if sampling.seed is not None:
        seeds = [request_seed(sampling.seed, groups[index].prompt.id, "self_hint", level) for index, level in todo]
    requests = [tokenize(self_hint_request(groups[index].prompt, level=level)) for index, level in todo]
    completions = []
    if requests:
        completions = engine.generate(requests, replace(sampling, max_new_tokens=max_new_tokens), seeds=seeds)
    written = {
        (groups[index].prompt.id, level): accept_self_hint(completion.text, prompt=groups[index].prompt)
        for (index, level), completion in zip(todo, completions, strict=True)
    }
    known = {**cache, **written}
    hinted = list(groups)
    for index in indices:
        prompt = groups[index].prompt
        levels = [known[prompt.id, level] for level in range(len(SELF_HINT_STRENGTHS))]
        if any(levels):
            hint = [text for text in levels if text is not None]
            hinted[index] = replace(groups[index], prompt=replace(prompt, hint=hint))
    return hinted, written, Metrics(counts={
        "self_hint/num_written": sum(text is not None for text in written.values()),
        "self_hint/leaks_rejected": sum(text is None for text in written.values()),
        "self_hint/cache_hits": len(wanted) - len(todo),
        "self_hint/generated_tokens": sum(len(completion.response_ids) for completion in completions),
        "time/rollout_s": time.perf_counter() - start,
    })  # fmt: skip


def score_groups(
    groups: list[RolloutGroup], reward_pool: RewardPool, *, prefix: str
) -> tuple[list[RolloutGroup], Metrics]:
    """The groups with their rollouts' rewards; the mean reward and accuracy under `prefix`, how many groups have
    reward variance (the ones plain GRPO learns from), and time/reward_s."""
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
    counts = {
        f"{prefix}/num_groups_with_variance": sum(has_reward_variance(group) for group in scored),
        "time/reward_s": time.perf_counter() - start,
    }
    return scored, Metrics(counts=counts, means=means)
