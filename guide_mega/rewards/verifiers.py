"""Reward functions by name: math (math-verify), exact match, reasoning-gym's own scorers, code (programs run
against tests in a sandbox, `code.py`) and multiple choice (`choices.py`).

Every reward function has the signature `fn(response, *, answer, metadata, options) -> RewardResult`. They run
inside the worker processes of `RewardPool` (on the worker's main thread, which math-verify's signal-based
timeouts need), or directly in tests. A response is *correct* when the verifier accepts its extracted answer; the
reward is 1 for correct, plus `format_bonus` for a well-formatted response, and 0 when the format gate rejects it.
A reward.name of the form `module:function` or `file.py:function` is the user's own function (`custom.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guide_mega.config import ConfigError
from guide_mega.rewards.answers import ExtractedAnswer, extract_answer, extract_boxed
from guide_mega.rewards.choices import multiple_choice_reward
from guide_mega.rewards.code import code_reward
from guide_mega.rewards.custom import canonical_custom_name, custom_reward, is_custom_reward, load_custom_reward
from guide_mega.rewards.results import RewardOptions, RewardResult, failed_result, finish_result

# Key of Prompt.metadata holding the reasoning-gym entry ({question, answer, metadata}) its scorer needs.
REASONING_GYM_ENTRY_KEY = "reasoning_gym_entry"


@dataclass(frozen=True, kw_only=True)
class RewardTask:
    """One response to score, as sent to a worker process (everything in it must pickle)."""

    reward_name: str
    response: str
    prompt: str | list[dict] | None = None
    """The hint-free prompt; only a user reward function (`custom.py`) reads it."""
    answer: str | list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    options: RewardOptions = field(default_factory=RewardOptions)


def _finish(response: str, extracted: ExtractedAnswer | None, correct: bool, options: RewardOptions) -> RewardResult:
    return finish_result(response, extracted.text if extracted is not None else None, correct, options)


def _ground_truths(answer: str | list[str]) -> list[str]:
    """Ground-truth strings, with a surrounding `\\boxed{}` removed (the authors' data sometimes has one)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    return [extract_boxed(text) or text.strip() for text in answers]


def _normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(".").lower()


def math_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if math-verify finds the extracted answer equivalent to any ground truth (exact text first)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    extracted = extract_answer(response, lenient=options.lenient)
    if extracted is None:
        return _finish(response, None, False, options)
    truths = _ground_truths(answer)
    if _normalize(extracted.text) in {_normalize(truth) for truth in truths}:
        return _finish(response, extracted, True, options)
    timeout_s = options.verify_timeout_s
    try:
        # Both sides go through \boxed{} so math-verify parses exactly the extracted text, not a guess at it.
        # raise_on_error: math-verify otherwise turns its own timeouts into a silent "incorrect".
        predicted = parse(f"\\boxed{{{extracted.text}}}", parsing_timeout=timeout_s, raise_on_error=True)
        correct = any(
            verify(
                parse(f"\\boxed{{{truth}}}", parsing_timeout=timeout_s, raise_on_error=True),
                predicted,
                timeout_seconds=timeout_s,
                raise_on_error=True,
            )
            for truth in truths
        )
    except TimeoutException as exc:
        return failed_result("timeout", f"math-verify timed out: {exc}")
    return _finish(response, extracted, correct, options)


def exact_match_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if the extracted answer equals a ground truth up to whitespace, case and a final period."""
    extracted = extract_answer(response, lenient=options.lenient)
    truths = {_normalize(truth) for truth in _ground_truths(answer)}
    correct = extracted is not None and _normalize(extracted.text) in truths
    return _finish(response, extracted, correct, options)


@functools.cache
def _reasoning_gym_scorer(task: str) -> Callable[[str | None, dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def reasoning_gym_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if the task's own reasoning-gym scorer gives the extracted answer full marks (score >= 1)."""
    entry = metadata.get(REASONING_GYM_ENTRY_KEY)
    if entry is None:
        raise KeyError(f"reasoning_gym reward: prompt metadata has no {REASONING_GYM_ENTRY_KEY!r} entry")
    extracted = extract_answer(response, lenient=options.lenient)
    task = entry["metadata"]["source_dataset"]
    score = _reasoning_gym_scorer(task)(extracted.text if extracted is not None else None, entry)
    return _finish(response, extracted, math.isfinite(score) and score >= 1.0, options)


RewardFn = Callable[..., RewardResult]

REWARD_FNS: dict[str, RewardFn] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "reasoning_gym": reasoning_gym_reward,
    "code": code_reward,
    "multiple_choice": multiple_choice_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered under `name`."""
    if name not in REWARD_FNS:
        forms = "or a function of your own: 'package.module:function' or 'path/to/file.py:function'"
        raise ConfigError(f"reward.name: unknown reward {name!r}; registered: {sorted(REWARD_FNS)}, {forms}")
    return REWARD_FNS[name]


def check_reward_name(name: str) -> str:
    """`name` as workers should see it, after checking that it names a registered reward or an importable user
    function with the right signature (ConfigError otherwise)."""
    if not is_custom_reward(name):
        get_reward_fn(name)
        return name
    name = canonical_custom_name(name)
    load_custom_reward(name)
    return name


def score_task(task: RewardTask) -> RewardResult:
    """Score one task in this process; an exception in the verifier becomes an error result, never a crash."""
    try:
        if is_custom_reward(task.reward_name):
            return custom_reward(
                task.reward_name, prompt=task.prompt, response=task.response, answer=task.answer, metadata=task.metadata
            )
        reward_fn = get_reward_fn(task.reward_name)
        return reward_fn(task.response, answer=task.answer, metadata=task.metadata, options=task.options)
    except Exception as exc:  # a verifier bug on one odd response must not stop the training step
        return failed_result("error", f"{type(exc).__name__}: {exc}")
