"""CHAMP (champ-dataset) competition problems as a prompt source, with the dataset's own hints.

Each problem lists its hints (`H_...` ids in `ch_list`); those that do not leak the answer are joined into the
prompt's hint. Answers are free-form math, so the `math` reward (math-verify) scores them.
"""

from __future__ import annotations

from guide_mega.data.files import PromptSet
from guide_mega.data.hints import hint_leaks_answer
from guide_mega.types import Prompt

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_HINT_PREFIX = "H_"


def load_champ(
    *, version: str = "v0", categories: list[str] | None = None, instruction: str = BOXED_INSTRUCTION
) -> PromptSet:
    """The CHAMP problems (optionally only some categories, e.g. ['Number-Theory']), hinted where possible."""
    import champ_dataset

    dataset = champ_dataset.load(version)
    prompts, num_without_hint = [], 0
    for problem in dataset.problems.values():
        if categories is not None and problem.category not in categories:
            continue
        hints = [
            dataset.hints[item].text
            for item in problem.ch_list
            if item.startswith(_HINT_PREFIX) and item in dataset.hints
        ]
        hints = [hint for hint in hints if not hint_leaks_answer(hint, answer=problem.answer, question=problem.text)]
        num_without_hint += not hints
        prompts.append(
            Prompt(
                id=f"champ/{problem.identifier}",
                prompt=f"{problem.text}\n{instruction}",
                answer=problem.answer,
                hint=" ".join(hints) if hints else None,
                source=f"champ/{problem.category}",
            )
        )
    return PromptSet(prompts=prompts, num_without_hint=num_without_hint)
