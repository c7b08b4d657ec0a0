"""Answer extraction and the format gate's check."""

import pytest

from guide_mega.rewards.answers import (
    extract_answer,
    extract_answer_line,
    extract_boxed,
    extract_last_number,
    is_well_formatted,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("complete \\boxed{3} then broken \\boxed{4", "3"),
        ("no box here", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == (expected or None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I think 3.\nAnswer: 26", "26"),
        ("Answer: 1\nwait\nAnswer: 2.", "2"),
        ("**Answer:** $26$", "26"),
        ("The final answer:\n\n  12  \n", "12"),
        ("answer : x = 3", "x = 3"),
        ("Answer:", None),
        ("no marker 5", None),
    ],
)
def test_extract_answer_line(text, expected):
    assert extract_answer_line(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("17 + 25 = 32", "32"), ("it costs 1,000 dollars", "1000"), ("3, 4", "4"), ("-2.5 or 1/3", "1/3"), ("none", None)],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_precedence_and_lenient_fallback():
    assert extract_answer("Answer: 5, i.e. \\boxed{6}").method == "boxed"
    assert extract_answer("Answer: 5").text == "5"
    assert extract_answer("18 + 8 = 26 legs") is None
    lenient = extract_answer("18 + 8 = 26 legs", lenient=True)
    assert (lenient.text, lenient.method) == ("26", "last_number")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Work.\nSo the result is \\boxed{26}.", True),
        ("Work.\nAnswer: 26\n\n", True),
        ("\\boxed{1} or \\boxed{2}", False),
        ("\\boxed{26}\nand some afterthought", False),
        ("Answer: 3\nAnswer: 4", False),
        ("Answer: 26 is early\nthen more text", False),
        ("Answer:", False),
        ("just 26", False),
    ],
)
def test_is_well_formatted(text, expected):
    assert is_well_formatted(text) is expected
