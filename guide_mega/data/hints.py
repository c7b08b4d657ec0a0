"""The leak check every generated hint passes: a hint may guide, but must not state the final answer."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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
