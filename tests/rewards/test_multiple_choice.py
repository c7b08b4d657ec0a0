"""Multiple-choice extraction (the forms models write, English words that look like letters) and verification."""

import pytest

from guide_mega.rewards.choices import extract_choice, gold_letters, multiple_choice_reward
from guide_mega.rewards.results import RewardOptions
from guide_mega.rewards.verifiers import RewardTask, get_reward_fn, score_task

CAPITALS = ["London", "Paris", "Rome", "Berlin"]


@pytest.mark.parametrize(
    ("response", "choice"),
    [
        ("Answer: (B)", "B"),
        ("Answer: b", "B"),
        ("So the result is \\boxed{C}.", "C"),
        ("\\boxed{\\text{(E)}}", "E"),
        ("The answer is D.", "D"),
        ("the correct option is c", "C"),
        ("Answer: B) because of the heat capacity", "B"),
        ("**Answer:** **A**", "A"),
        ("Between (A) and (C), only (C) conserves energy.", "C"),
        ("The options are A, B, C and D. After checking each, B is correct.", "B"),
        ("I think A cat cannot do this, so the answer is J", "J"),
        ("I believe the answer is I think G", "G"),
        ("The answer is a tricky one. Final choice: H", "H"),
        ("\\boxed{B} was my first guess. Answer: D", "B"),
        ("No letter here at all.", None),
        ("A student might think so, but I disagree.", None),
    ],
)
def test_extract_choice(response, choice):
    assert extract_choice(response) == choice


def test_only_the_problems_letters_and_option_texts_count():
    assert extract_choice("Answer: Paris", choices=CAPITALS) == "B"
    assert extract_choice("\\boxed{rome}", choices=CAPITALS) == "C"
    # With four options, E is not a choice: the last valid letter wins.
    assert extract_choice("Option D. (E) is not listed", choices=CAPITALS) == "D"
    assert extract_choice("Answer: Paris") is None


def test_gold_answers_as_letters_or_texts():
    assert gold_letters("(b)", None) == {"B"}
    assert gold_letters(["A", "\\boxed{C}"], None) == {"A", "C"}
    assert gold_letters("Berlin", CAPITALS) == {"D"}
    with pytest.raises(ValueError, match="neither an option letter"):
        gold_letters("Madrid", CAPITALS)


def test_multiple_choice_reward_and_format_gate():
    metadata = {"choices": CAPITALS}
    right = multiple_choice_reward("It is the capital of France.\nAnswer: B", answer="Paris", metadata=metadata,
                                   options=RewardOptions(format_bonus=0.1))  # fmt: skip
    assert right.correct and right.reward == pytest.approx(1.1) and right.extracted == "B"
    wrong = multiple_choice_reward("Answer: (A)", answer="B", metadata={}, options=RewardOptions())
    assert (wrong.correct, wrong.reward) == (False, 0.0)
    hedged = multiple_choice_reward("\\boxed{B} or \\boxed{C}", answer="C", metadata={},
                                    options=RewardOptions(format_gate=True))  # fmt: skip
    assert (hedged.correct, hedged.reward) == (False, 0.0)


def test_registered_and_bad_gold_is_a_counted_error():
    assert get_reward_fn("multiple_choice") is multiple_choice_reward
    result = score_task(
        RewardTask(reward_name="multiple_choice", response="Answer: A", answer="Madrid", metadata={"choices": CAPITALS})
    )
    assert (result.status, result.reward) == ("error", 0.0)
