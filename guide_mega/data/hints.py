"""The leak check every generated hint passes (a hint may guide, but must not state the final answer), and the
request that asks the policy to write a hint itself (algorithm.guide.hint_source = self).

Self-written hints (after NuRL and SAGE, `shared/reference/anchors_2026.md` §3): for a problem that has a reference
solution but no hint, the rollout engine is shown the problem and the solution and asked for a hint of a given
strength (`SELF_HINT_STRENGTHS`, weakest first: the levels of graded hints). The reference solution is
`Prompt.metadata['solution']` when the data gives one, else the answer itself.
"""

from __future__ import annotations

import re

from guide_mega.types import Prompt

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

SELF_HINT_TEMPLATE = (
    "Here is a problem and its reference solution.\n\nProblem: {problem}\n\nReference solution: {solution}\n\n"
    "A student is stuck on this problem. Write a hint for them: {strength}. Do not state the final answer. "
    "Reply with the hint only."
)
"""The hint writer's request; fields {problem}, {solution} and {strength}."""

SELF_HINT_STRENGTHS = (
    "one sentence naming the key fact or idea needed",
    "the steps to follow, one short sentence each",
)
"""What the hint of each level should say, weakest first."""

SOLUTION_KEY = "solution"


def _numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(text))


def hint_leaks_answer(hint: str, *, answer: str, question: str) -> bool:
    """True when the answer appears in the hint (as a number, or verbatim) and not already in the question.

    A numeric answer is compared number by number, so the answer 8 does not leak through "18"; an answer the
    question already contains leaks nothing new.
    """
    answer = answer.strip()
    if _NUMBER.fullmatch(answer):
        return answer in _numbers(hint) and answer not in _numbers(question)
    return answer.lower() in hint.lower() and answer.lower() not in question.lower()


def problem_text(prompt: Prompt) -> str:
    """The problem as text: the prompt, or the content of its last user message."""
    if isinstance(prompt.prompt, str):
        return prompt.prompt
    return [message for message in prompt.prompt if message["role"] == "user"][-1]["content"]


def self_hint_request(prompt: Prompt, *, level: int) -> str:
    """The request that asks the policy for `prompt`'s hint at `level` (an index into SELF_HINT_STRENGTHS)."""
    answers = prompt.answer if isinstance(prompt.answer, list) else [prompt.answer]
    solution = prompt.metadata.get(SOLUTION_KEY) or " or ".join(answers)
    return SELF_HINT_TEMPLATE.format(
        problem=problem_text(prompt), solution=solution, strength=SELF_HINT_STRENGTHS[level]
    )


def accept_self_hint(text: str, *, prompt: Prompt) -> str | None:
    """The written hint, stripped, or None when it is empty or leaks any of the prompt's answers."""
    hint = text.strip()
    answers = prompt.answer if isinstance(prompt.answer, list) else [prompt.answer]
    question = problem_text(prompt)
    if not hint or any(hint_leaks_answer(hint, answer=answer, question=question) for answer in answers):
        return None
    return hint
