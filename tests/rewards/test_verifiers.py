"""Reward functions run in-process: math-verify equivalence, exact match, reasoning-gym scoring, format gate."""

import pytest
import reasoning_gym

from guide_mega.rewards.verifiers import (
    REASONING_GYM_ENTRY_KEY,
    RewardOptions,
    RewardTask,
    exact_match_reward,
    get_reward_fn,
    math_reward,
    reasoning_gym_reward,
    score_task,
)

OPTIONS = RewardOptions()


@pytest.mark.parametrize(
    ("response", "answer", "correct"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("Answer: 1/2", "\\frac{1}{2}", True),
        ("\\boxed{x + 1}", "1+x", True),
        ("\\boxed{26}", "\\boxed{26}", True),
        ("\\boxed{27}", ["25", "27"], True),
        ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", True),
        ("\\boxed{27}", "26", False),
        ("\\boxed{\\frac{}", "3", False),
        ("twenty-six", "26", False),
    ],
)
def test_math_reward_equivalence(response, answer, correct):
    result = math_reward(response, answer=answer, metadata={}, options=OPTIONS)
    assert result.correct is correct
    assert result.reward == float(correct)
    assert result.status == "ok"


def test_lenient_extraction_only_when_asked():
    response = "2 spiders have 16 legs, plus 4 is 20"
    assert not math_reward(response, answer="20", metadata={}, options=OPTIONS).correct
    assert math_reward(response, answer="20", metadata={}, options=RewardOptions(lenient=True)).correct


def test_format_gate_and_bonus():
    sloppy = "\\boxed{26} but maybe \\boxed{26}"
    gated = math_reward(sloppy, answer="26", metadata={}, options=RewardOptions(format_gate=True))
    assert (gated.reward, gated.correct, gated.is_formatted) == (0.0, False, False)
    bonus = RewardOptions(format_bonus=0.1)
    tidy = math_reward("so\n\\boxed{26}", answer="26", metadata={}, options=bonus)
    assert tidy.reward == pytest.approx(1.1) and tidy.correct
    wrong_but_tidy = math_reward("so\n\\boxed{25}", answer="26", metadata={}, options=bonus)
    assert wrong_but_tidy.reward == pytest.approx(0.1) and not wrong_but_tidy.correct


def test_exact_match_normalizes_case_space_and_period():
    assert exact_match_reward("Answer: Paris.", answer="paris", metadata={}, options=OPTIONS).correct
    assert not exact_match_reward("Answer: 0.5", answer="1/2", metadata={}, options=OPTIONS).correct


def test_reasoning_gym_reward_uses_the_task_scorer():
    dataset = reasoning_gym.create_dataset("leg_counting", size=1, seed=3, min_animals=2, max_animals=2)
    entry = dataset[0]
    metadata = {REASONING_GYM_ENTRY_KEY: entry}
    response = f"Answer: {entry['answer']}"
    right = reasoning_gym_reward(response, answer=entry["answer"], metadata=metadata, options=OPTIONS)
    assert right.correct and right.reward == 1.0
    # reasoning-gym gives partial credit to a longer string containing the answer; only full marks count.
    padded = f"Answer: {entry['answer']} legs"
    assert not reasoning_gym_reward(padded, answer=entry["answer"], metadata=metadata, options=OPTIONS).correct


def test_score_task_turns_verifier_errors_into_results():
    task = RewardTask(reward_name="reasoning_gym", response="Answer: 3", answer="3", metadata={})
    result = score_task(task)
    assert (result.status, result.reward) == ("error", 0.0)
    assert REASONING_GYM_ENTRY_KEY in result.error


def test_registry_names_unknown_reward():
    assert get_reward_fn("math") is math_reward
    with pytest.raises(ValueError, match="reward.name: unknown reward 'nope'"):
        get_reward_fn("nope")
