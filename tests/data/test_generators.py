"""Generator sources: reasoning-gym tasks with leak-checked hints from metadata, and CHAMP with its own hints."""

import pytest

from guide_mega.algorithms.guide import hinted_prompt
from guide_mega.config import DataConfig
from guide_mega.data.champ_source import load_champ
from guide_mega.data.hints import hint_leaks_answer
from guide_mega.data.reasoning_gym_source import build_hint_levels, load_reasoning_gym
from guide_mega.data.sources import load_prompt_source
from guide_mega.rewards.verifiers import RewardOptions, reasoning_gym_reward

LEG_COUNTING_2 = {"min_animals": 2, "max_animals": 2, "min_instances": 1, "max_instances": 3}


def leg_entry(animals):
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    listing = ", ".join(f"{count} {animal}{'s' if count > 1 else ''}" for animal, count in animals.items())
    total = sum(count * ANIMALS[animal] for animal, count in animals.items())
    question = f"Now, how many legs are there in total if you have {listing}?"
    return {"question": question, "answer": str(total), "metadata": {"animals": animals}}


def test_leg_counting_levels_go_from_legs_per_animal_to_subtotals():
    levels, leaked = build_hint_levels("leg_counting", leg_entry({"firefly": 3, "tiger": 2}))
    assert leaked == 0 and levels == [
        "A firefly has 6 legs; a tiger has 4 legs.",
        "Each firefly has 6 legs, so 3 fireflys have 3 x 6 = 18 legs; each tiger has 4 legs, so 2 tigers have "
        "2 x 4 = 8 legs. Add these numbers together.",
    ]


def test_every_level_is_leak_checked():
    # The snake has 0 legs, so the spider subtotal (16) is the answer: only the weaker level is left.
    assert build_hint_levels("leg_counting", leg_entry({"spider": 2, "snake": 1})) == (
        ["A spider has 8 legs; a snake has 0 legs."],
        1,
    )
    # One animal type: its subtotal is the total.
    assert build_hint_levels("leg_counting", leg_entry({"elephant": 3})) == (["An elephant has 4 legs."], 1)
    # 2 snakes: every level states 0 legs, the answer.
    assert build_hint_levels("leg_counting", leg_entry({"snake": 2})) == ([], 2)


def test_hint_leak_check_compares_whole_numbers():
    assert hint_leaks_answer("so 18 legs", answer="18", question="3 fireflys")
    assert not hint_leaks_answer("so 18 legs", answer="8", question="3 fireflys")
    assert not hint_leaks_answer("2 x 4 = 8", answer="8", question="8 cats")
    assert hint_leaks_answer("the capital is Paris", answer="paris", question="capital of France?")


def test_reasoning_gym_source_prompts_hints_and_scoring():
    prompt_set = load_prompt_source(
        "reasoning_gym:leg_counting", DataConfig(source_options={"size": 60, "seed": 5, **LEG_COUNTING_2})
    )
    prompts, instruction = prompt_set.prompts, "Put the final answer after 'Answer:'."
    assert sum(prompt.num_hint_levels == 2 for prompt in prompts) > 40  # most problems have both levels
    assert len(prompts) == 60 and len({prompt.id for prompt in prompts}) == 60
    assert prompt_set.num_without_hint == sum(not prompt.has_hint for prompt in prompts)
    assert prompt_set.num_without_hint < 10
    # Every problem built both levels; those it lacks were left out for leaking, and counted.
    assert prompt_set.num_hint_levels_leaked == sum(2 - prompt.num_hint_levels for prompt in prompts) > 0
    assert prompt_set.losses_line() == (
        f"data: 60 prompts; 0 malformed rows skipped; {prompt_set.num_without_hint} problems without a usable hint; "
        f"{prompt_set.num_hint_levels_leaked} hint levels left out for stating the answer"
    )
    for prompt in prompts:
        entry = prompt.metadata["reasoning_gym_entry"]
        assert prompt.prompt.endswith("?\nPut the final answer after 'Answer:'.")
        assert prompt.answer == entry["answer"]
        for level, hint in enumerate(prompt.hint or []):
            assert not hint_leaks_answer(hint, answer=prompt.answer, question=entry["question"])
            hinted = prompt.prompt.replace("\nPut", f"\nHint: {hint}\nPut")
            assert hinted_prompt(prompt, template="{prompt} / {hint}", level=level) == hinted
        assert prompt.hint is None or hinted_prompt(prompt).endswith(f"Hint: {prompt.hint[-1]}\n{instruction}")
    first = prompts[0]
    result = reasoning_gym_reward(
        f"Answer: {first.answer}", answer=first.answer, metadata=first.metadata, options=RewardOptions()
    )
    assert result.correct


def test_reasoning_gym_is_deterministic_and_chain_sum_is_hinted():
    first = load_reasoning_gym("leg_counting", size=5, seed=9, **LEG_COUNTING_2).prompts
    again = load_reasoning_gym("leg_counting", size=5, seed=9, **LEG_COUNTING_2).prompts
    assert [prompt.prompt for prompt in first] == [prompt.prompt for prompt in again]
    chain = load_reasoning_gym("chain_sum", size=20, seed=1, min_terms=3, max_terms=3, min_digits=1, max_digits=1)
    hinted = [prompt for prompt in chain.prompts if prompt.has_hint]
    assert hinted and all(prompt.hint[-1].startswith("First compute ") for prompt in hinted)
    assert chain.num_without_hint == 20 - len(hinted)


def test_reasoning_gym_task_without_hint_builder():
    prompt_set = load_reasoning_gym("basic_arithmetic", size=3, seed=1)
    assert prompt_set.num_without_hint == 3


def test_champ_problems_with_their_hints():
    prompt_set = load_champ(categories=["Number-Theory"])
    assert len(prompt_set.prompts) == 80
    hinted = [prompt for prompt in prompt_set.prompts if prompt.has_hint]
    assert len(hinted) > 60
    for prompt in hinted:
        assert not hint_leaks_answer(prompt.hint, answer=prompt.answer, question=prompt.prompt)
    assert all(prompt.source == "champ/Number-Theory" for prompt in prompt_set.prompts)


def test_source_options_must_match_the_source():
    with pytest.raises(ValueError, match="is a prompt file, which takes no generator options"):
        load_prompt_source("train.jsonl", DataConfig(source_options={"size": 3}))
