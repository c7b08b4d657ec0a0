"""Code-reward test specs from data (issue 18.4): what data loading cannot check, since it does not know the reward.

A spec in `metadata["tests"]` is checked when the prompt file loads (tests/data/test_rows.py); a spec given as the
JSON answer is read only by `rewards/code.py`, which checks it there.
"""

import json

import pytest

from guide_mega.rewards.code import code_reward, load_tests
from guide_mega.rewards.results import RewardOptions
from guide_mega.rewards.sandbox import SandboxLimits

OPTIONS = RewardOptions(code_limits=SandboxLimits(wall_s=20.0))


@pytest.mark.parametrize(
    "spec",
    [{"inputs": "1 2\n", "outputs": "3\n"}, {"asserts": "assert add(1, 2) == 3"}, {"inputs": ["1"], "outputs": [3]}],
    ids=["inputs_string", "asserts_string", "output_not_text"],
)
def test_a_json_answer_with_tests_not_given_as_lists_of_strings_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="code reward: .*list of strings"):
        load_tests(json.dumps(spec), {})


def test_a_correct_program_scores_one_on_a_prompt_mixing_stdin_and_assert_tests():
    program = "def add(a, b):\n    return a + b\n\na, b = map(int, input().split())\nprint(add(a, b))\n"
    spec = {"inputs": ["1 2\n"], "outputs": ["3\n"], "asserts": ["assert add(1, 2) == 3"]}
    result = code_reward(f"```python\n{program}```", answer="unused", metadata={"tests": spec}, options=OPTIONS)
    assert result.correct, result.error
