"""`evaluate` writes every generation it scores, sampled and greedy, with the hint when the evaluation is hinted."""

import json

import pytest

from guide_mega.config import RewardConfig
from guide_mega.evaluation.runner import EvalSettings, evaluate
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.types import Prompt


class ScriptedEngine:
    """Answers '2' to sampled requests and '0' greedily; a 3-token prompt (the hinted one) runs out of tokens."""

    def generate(self, requests, sampling):
        return [
            Completion(
                response_ids=[1, 2], logprobs=[-1.0, -1.0], text="Answer: 0" if sampling.is_greedy else "Answer: 2",
                finish_reason="length" if len(ids) == 3 else "stop",
            )
            for ids in requests
        ]  # fmt: skip


@pytest.fixture(scope="module")
def pool():
    with RewardPool.from_config(RewardConfig(name="exact_match", num_workers=1, timeout_s=10.0)) as reward_pool:
        yield reward_pool


@pytest.mark.parametrize("with_hints", [False, True])
def test_every_generation_is_a_row(pool, tmp_path, with_hints):
    problems = [Prompt(id="a", prompt="one two", answer="2", hint="even")]
    settings = EvalSettings(num_samples=3, sampling=SamplingParams(max_new_tokens=2), with_hints=with_hints,
                            hint_template="{prompt} {hint}")  # fmt: skip
    path = tmp_path / "generations.jsonl"
    results = evaluate(
        ScriptedEngine(), pool, problems, tokenize=lambda text: [0] * len(text.split()), settings=settings,
        show_progress=False, generations_path=path,
    )  # fmt: skip
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert results.problems[0].num_correct == 3
    assert [(row["greedy"], row["correct"], row["response"]) for row in rows] == [
        (False, True, "Answer: 2"), (False, True, "Answer: 2"), (False, True, "Answer: 2"), (True, False, "Answer: 0"),
    ]  # fmt: skip
    assert {row["hint"] for row in rows} == {"even" if with_hints else None}
    assert {row["guided"] for row in rows} == {with_hints}
    assert {row["finish_reason"] for row in rows} == {"length" if with_hints else "stop"}
    assert rows[0]["prompt_id"] == "a" and rows[0]["prompt"] == "one two" and rows[0]["response_tokens"] == 2
    assert rows[0]["extracted"] == "2" and rows[0]["reward"] == 1.0
