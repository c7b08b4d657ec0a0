"""Final-answer extraction from model responses, and the format check of the optional format gate.

A response states its final answer as the last `\\boxed{...}` (nested braces allowed) or on an `Answer:` line.
The lenient fallback, for models too small to follow the format, takes the last number in the response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ExtractionMethod = Literal["boxed", "answer_line", "last_number"]

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
# A box command and the brace that opens its argument (spaces and tabs may come between).
_BOXED_OPENING = re.compile("(?:" + "|".join(re.escape(command) for command in _BOXED_COMMANDS) + r")[ \t]*\{")
# A backslash with the character it escapes, or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_MARKER = re.compile(r"\banswer\s*:", re.IGNORECASE)
# Thousands separators only in groups of three, so "3, 4" stays two numbers while "1,000" is one.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
# Decoration a model puts around an answer on its line: markdown emphasis, math delimiters, a final period.
_DECORATION = " \t*$`"
_TRAILING_PUNCTUATION = ".;,"


@dataclass(frozen=True)
class ExtractedAnswer:
    text: str
    method: ExtractionMethod


def _closing_braces(text: str) -> dict[int, int]:
    """The index of the matching `}` of every closed `{` in `text`, in one pass over its braces (so that finding the
    box of each of thousands of `\\boxed{` stays linear). Escaped braces (`\\{`, `\\}`) are literal characters in
    LaTeX, so they do not count."""
    closing, opened = {}, []
    for token in _BRACE_TOKEN.finditer(text):
        char = token.group()
        if char == "{":
            opened.append(token.start())
        elif char == "}" and opened:
            closing[opened.pop()] = token.start()
    return closing


def _boxed_spans(text: str) -> list[tuple[int, int, int, int]]:
    """(start, content start, content end, end) of every complete `\\boxed{...}` / `\\fbox{...}`, in order."""
    closing = _closing_braces(text)
    spans = []
    for match in _BOXED_OPENING.finditer(text):
        brace = match.end() - 1
        if brace in closing:
            spans.append((match.start(), brace + 1, closing[brace], closing[brace] + 1))
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in `text`, or None (also when that box is empty)."""
    spans = _boxed_spans(text)
    if not spans:
        return None
    _, content_start, content_end, _ = spans[-1]
    return text[content_start:content_end].strip() or None


def _clean(answer: str) -> str:
    answer = answer.strip(_DECORATION)
    return answer.rstrip(_TRAILING_PUNCTUATION).strip(_DECORATION)


def extract_answer_line(text: str) -> str | None:
    """What follows the last `Answer:` marker on its line (or on the next non-empty line), cleaned, or None."""
    markers = list(_ANSWER_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end() :]
    for line in rest.splitlines() or [""]:
        cleaned = _clean(line)
        if cleaned:
            return cleaned
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (integer, decimal or simple fraction), thousands separators removed, or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, *, lenient: bool = False) -> ExtractedAnswer | None:
    """The final answer: the last `\\boxed{}`, else the `Answer:` line, else (lenient only) the last number."""
    boxed = extract_boxed(text)
    if boxed:
        return ExtractedAnswer(boxed, "boxed")
    line = extract_answer_line(text)
    if line:
        return ExtractedAnswer(line, "answer_line")
    if lenient:
        number = extract_last_number(text)
        if number is not None:
            return ExtractedAnswer(number, "last_number")
    return None


def _last_nonempty_line_span(text: str) -> tuple[int, int]:
    stripped = text.rstrip()
    return stripped.rfind("\n") + 1, len(stripped)


def is_well_formatted(text: str) -> bool:
    """True when the response states exactly one final answer, on its last non-empty line.

    The answer is either exactly one `\\boxed{...}` or exactly one `Answer:` marker followed by a non-empty
    answer. This is the format gate: a response that hedges between several boxed answers, or buries its answer
    mid-text, fails it.
    """
    line_start, line_end = _last_nonempty_line_span(text)
    spans = _boxed_spans(text)
    if spans:
        (start, content_start, content_end, end), *others = spans
        has_content = text[content_start:content_end].strip() != ""
        return not others and has_content and start >= line_start and end <= line_end
    markers = list(_ANSWER_MARKER.finditer(text))
    if len(markers) != 1 or markers[0].start() < line_start:
        return False
    return _clean(text[markers[0].end() : line_end]) != ""
