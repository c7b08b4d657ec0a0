"""Multiple-choice answers (science sets such as GPQA, MMLU-Pro, SciQ): which option, A to J, a response chose.

The choice is read, most explicit form first:
1. the last `\\boxed{...}`: a letter (`B`, `(B)`, `\\text{B}`, `B) 42`) or the text of an option;
2. the last `Answer:` line, read the same way;
3. the letter right after the last answer phrase that has one ("the answer is (D)", "correct option is c");
4. the last standalone capital letter ("(C)", "so B."), except `A` and `I` followed by a lowercase word, which are
   English ("A cat", "I think").
Only the problem's letters count: with `Prompt.metadata["choices"]` (the option texts, in order) the first
len(choices) letters, else A to J. The gold answer is a letter ("B", "(b)") or, with choices, an option's text.
"""

from __future__ import annotations

import re
from typing import Any

from guide_mega.rewards.answers import extract_answer_line, extract_boxed
from guide_mega.rewards.results import RewardOptions, RewardResult, finish_result

CHOICES_METADATA_KEY = "choices"
ALL_LETTERS = "ABCDEFGHIJ"
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DECORATION = " \t*_`$()[]{}.:"
# "B) Paris", "C. 42", "A: text": a letter, then the separator of an option list.
_LISTED_LETTER = re.compile(r"([A-Ja-j])\s*[).:]\s")
_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is)?\s*:?", re.IGNORECASE)
_LETTER_AFTER_PHRASE = re.compile(r"[\s*_`$(\[{]*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?\s*([A-Ja-j])(?![A-Za-z0-9])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'\\])([A-J])(?![A-Za-z0-9'])")
_ENGLISH_WORD_FOLLOWS = re.compile(r"\s+[a-z]")


def option_letters(choices: list[str] | None) -> str:
    """The letters a problem's options use: one per choice, else A to J."""
    return ALL_LETTERS[: len(choices)] if choices else ALL_LETTERS


def _normalize(text: str) -> str:
    return " ".join(text.split()).strip(_DECORATION).lower()


def letter_of_text(text: str, *, choices: list[str] | None = None) -> str | None:
    """The option `text` names: a letter with decoration (`(B)`, `\\text{b}`, `C) 42`) or an option's full text."""
    letters = option_letters(choices)
    core = _LATEX_TEXT.sub(r"\1", text).strip(_DECORATION)
    if len(core) == 1 and core.upper() in letters:
        return core.upper()
    listed = _LISTED_LETTER.match(core + " ")
    if listed and listed.group(1).upper() in letters:
        return listed.group(1).upper()
    if choices:
        texts = [_normalize(choice) for choice in choices]
        if _normalize(core) in texts:
            return letters[texts.index(_normalize(core))]
    return None


def _letter_after_phrases(text: str, letters: str) -> str | None:
    for phrase in reversed(list(_ANSWER_PHRASE.finditer(text))):
        match = _LETTER_AFTER_PHRASE.match(text, phrase.end())
        if match is None or match.group(1).upper() not in letters:
            continue
        # A lowercase letter or an I followed by a word is English ("the answer is a tricky one", "is I think B").
        letter = match.group(1)
        if (letter.islower() or letter == "I") and _ENGLISH_WORD_FOLLOWS.match(text, match.end()):
            continue
        return letter.upper()
    return None


def _last_standalone_letter(text: str, letters: str) -> str | None:
    for match in reversed(list(_STANDALONE_LETTER.finditer(text))):
        letter = match.group(1)
        if letter not in letters or (letter in "AI" and _ENGLISH_WORD_FOLLOWS.match(text, match.end())):
            continue
        return letter
    return None


def extract_choice(response: str, *, choices: list[str] | None = None) -> str | None:
    """The option letter the response chose (see the module docstring for the forms, in order), or None."""
    letters = option_letters(choices)
    for stated in (extract_boxed(response), extract_answer_line(response)):
        letter = letter_of_text(stated, choices=choices) if stated else None
        if letter is not None:
            return letter
    return _letter_after_phrases(response, letters) or _last_standalone_letter(response, letters)


def gold_letters(answer: str | list[str], choices: list[str] | None) -> set[str]:
    """The letters of the right options; raises ValueError for a gold answer that names no option."""
    golds = set()
    for text in [answer] if isinstance(answer, str) else answer:
        letter = letter_of_text(extract_boxed(text) or text, choices=choices)
        if letter is None:
            raise ValueError(
                f"multiple_choice reward: gold answer {text!r} is neither an option letter nor an option's text"
            )
        golds.add(letter)
    return golds


def multiple_choice_reward(
    response: str, *, answer: str | list[str], metadata: dict[str, Any], options: RewardOptions
) -> RewardResult:
    """Correct if the chosen option is a gold one (options as letters or, with metadata['choices'], texts)."""
    choices = metadata.get(CHOICES_METADATA_KEY)
    golds = gold_letters(answer, choices)
    chosen = extract_choice(response, choices=choices)
    return finish_result(response, chosen, chosen in golds, options)
