"""Self-written hints: the request the policy answers, the leak check of what it writes, the loader's cache."""

import json

from guide_mega.data.hints import SELF_HINT_STRENGTHS, accept_self_hint, self_hint_request
from guide_mega.data.loader import PromptLoader
from guide_mega.types import Prompt

CATS = Prompt(id="c", prompt="How many legs do 2 cats and 1 bird have?", answer="10")


def test_the_request_shows_problem_solution_and_strength():
    request = self_hint_request(CATS, level=1)
    assert "Problem: How many legs do 2 cats and 1 bird have?" in request
    assert "Reference solution: 10" in request  # no solution in the data: the answer stands in
    assert SELF_HINT_STRENGTHS[1] in request and "Do not state the final answer" in request
    chat = Prompt(id="m", prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": "2 + 2?"}],
                  answer=["4", "four"], metadata={"solution": "2 + 2 = 4"})  # fmt: skip
    request = self_hint_request(chat, level=0)
    assert "Problem: 2 + 2?" in request and "Reference solution: 2 + 2 = 4" in request
    assert SELF_HINT_STRENGTHS[0] in request


def test_a_written_hint_that_states_the_answer_is_rejected():
    assert accept_self_hint("  A cat has 4 legs, a bird 2.\n", prompt=CATS) == "A cat has 4 legs, a bird 2."
    assert accept_self_hint("2 x 4 + 2 = 10 legs", prompt=CATS) is None
    assert accept_self_hint("   ", prompt=CATS) is None
    words = Prompt(id="w", prompt="Say a number.", answer=["4", "four"])
    assert accept_self_hint("It is Four.", prompt=words) is None  # any accepted answer leaks


def test_written_hints_are_loader_state_and_resume_exactly():
    prompts = [CATS, Prompt(id="d", prompt="p", answer="1")]
    loader = PromptLoader(prompts, seed=0)
    loader.update_self_hints({("c", 0): "A cat has 4 legs.", ("c", 1): None})
    resumed = PromptLoader(prompts, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert dict(resumed.self_hints) == {("c", 0): "A cat has 4 legs.", ("c", 1): None}
