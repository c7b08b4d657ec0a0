"""reasoning-gym tasks as a prompt source, with hints built from each problem's metadata.

A hint must help without stating the final answer. Each task has a list of hint builders, weakest first, and a
problem's hint is the list of the levels they build (graded hints, algorithm.guide.levels): leg_counting gives the
legs of each animal, then each animal's subtotal, never the total. A hint *leaks* when the answer appears in it as a
number that the question does not already contain; every level is checked and a leaking level is left out. A problem
whose levels all leak gets no hint (counted in the PromptSet). Measured with SmolLM2-135M
(reference/demo_measurements.md): on leg_counting with two animal types the per-animal subtotal hint makes about half
of the unsolved problems solvable, against ~5% for a plain resample.

Prompt: `{question}\\n{instruction}`; hinted prompt: `{question}\\nHint: {hint}\\n{instruction}`, the layout
that measurement used, as the prompt's own `Prompt.hint_template`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guide_mega.data.files import PromptSet
from guide_mega.data.hints import hint_leaks_answer
from guide_mega.rewards.verifiers import REASONING_GYM_ENTRY_KEY
from guide_mega.types import Prompt

ANSWER_LINE_INSTRUCTION = "Put the final answer after 'Answer:'."

HintBuilder = Callable[[dict[str, Any]], str | None]


def _plural(animal: str, count: int) -> str:
    # reasoning-gym pluralises by appending "s" ("2 fireflys"); the hint repeats the question's own words.
    return f"{animal}s" if count > 1 else animal


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _leg_counting_subtotals(metadata: dict[str, Any]) -> str | None:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    parts = []
    for animal, count in metadata["animals"].items():
        legs = ANIMALS[animal]
        verb = "have" if count > 1 else "has"
        parts.append(
            f"each {animal} has {legs} legs, so {count} {_plural(animal, count)} {verb} {count} x {legs} = "
            f"{count * legs} legs"
        )
    text = "; ".join(parts)
    suffix = " Add these numbers together." if len(parts) > 1 else ""
    return f"{text[0].upper()}{text[1:]}.{suffix}"


def _leg_counting_legs_per_animal(metadata: dict[str, Any]) -> str | None:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    parts = [f"{_article(animal).lower()} {animal} has {ANIMALS[animal]} legs" for animal in metadata["animals"]]
    text = "; ".join(parts)
    return f"{text[0].upper()}{text[1:]}."


def _chain_sum_steps(metadata: dict[str, Any]) -> str | None:
    tokens = metadata["expression"].split()
    if len(tokens) < 5 or len(tokens) % 2 == 0:
        return None
    value, steps = int(tokens[0]), []
    for index in range(1, len(tokens) - 2, 2):
        operator, operand = tokens[index], int(tokens[index + 1])
        result = value + operand if operator == "+" else value - operand
        steps.append(f"compute {value} {operator} {operand} = {result}")
        value = result
    steps.append(f"compute {value} {tokens[-2]} {tokens[-1]}")
    return "First " + ". Then ".join(steps) + "."


HINT_BUILDERS: dict[str, list[HintBuilder]] = {
    "leg_counting": [_leg_counting_legs_per_animal, _leg_counting_subtotals],
    "chain_sum": [_chain_sum_steps],
}


def build_hint_levels(task: str, entry: dict[str, Any]) -> tuple[list[str], int]:
    """The graded hints of a reasoning-gym entry, weakest first (every level built that does not leak its answer),
    and how many built levels were left out because they leaked it."""
    built = [hint for builder in HINT_BUILDERS.get(task, []) if (hint := builder(entry["metadata"])) is not None]
    kept = [hint for hint in built if not hint_leaks_answer(hint, answer=entry["answer"], question=entry["question"])]
    return kept, len(built) - len(kept)


def _literal(text: str) -> str:
    # Text placed into a str.format template as is.
    return text.replace("{", "{{").replace("}", "}}")


def load_reasoning_gym(
    task: str,
    *,
    size: int = 500,
    seed: int = 1234,
    instruction: str = ANSWER_LINE_INSTRUCTION,
    hints: bool = True,
    **task_options: Any,
) -> PromptSet:
    """`size` problems of reasoning-gym task `task` (its config fields in `task_options`), with graded hints where
    possible.

    Each Prompt carries the reasoning-gym entry in its metadata, for the task's own scorer (reward
    `reasoning_gym`). `PromptSet.num_without_hint` counts the problems left without a hint, `num_hint_levels_leaked`
    the hint levels left out because they stated the answer. hints=False builds
    none (for hints the policy writes itself, algorithm.guide.hint_source = self).
    """
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_options)
    prompts, num_without_hint, num_leaked = [], 0, 0
    for index in range(size):
        entry = dataset[index]
        question = entry["question"].strip()
        levels, leaked = build_hint_levels(task, entry) if hints else ([], 0)
        num_without_hint += hints and not levels
        num_leaked += leaked
        prompts.append(
            Prompt(
                id=f"reasoning_gym/{task}/{seed}/{index}",
                prompt=f"{question}\n{instruction}",
                answer=entry["answer"],
                hint=levels or None,
                hint_template=f"{_literal(question)}\nHint: {{hint}}\n{_literal(instruction)}",
                source=f"reasoning_gym/{task}",
                metadata={REASONING_GYM_ENTRY_KEY: entry},
            )
        )
    return PromptSet(prompts=prompts, num_without_hint=num_without_hint, num_hint_levels_leaked=num_leaked)
