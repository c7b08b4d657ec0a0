"""`evaluate`: per-problem counts, greedy pass, hints and what is left out.

Sampling is scripted (a deterministic engine implementing the RolloutEngine protocol) so each problem's number of
correct samples is known; scoring goes through the real RewardPool. The real HF engine is exercised end to end by
tests/trainer/test_eval_command.py.
"""

import pytest

from guide_mega.config import RewardConfig
from guide_mega.evaluation.runner import EvalSettings, evaluate
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.types import Prompt

HINT_MARK = 7


def tokenize(content):
    return [HINT_MARK if word == "Hint:" else 100 + len(word) for word in content.split()]


class CountingEngine:
    """For the problem whose first word has k letters: the first `correct[k]` of every n consecutive sampled
    requests answer k (with the hint: `correct_hinted[k]`); greedy answers k when `greedy[k]`."""

    def __init__(self, *, correct, correct_hinted, greedy, num_samples):
        self.correct, self.correct_hinted, self.greedy, self.num_samples = correct, correct_hinted, greedy, num_samples
        self.requests = []

    def generate(self, requests, sampling):
        completions = []
        for ids in requests:
            key = ids[0] - 100
            self.requests.append((key, HINT_MARK in ids, sampling.is_greedy))
            if sampling.is_greedy:
                right = self.greedy[key]
            else:
                seen = sum(1 for k, h, g in self.requests[:-1] if k == key and h == (HINT_MARK in ids) and not g)
                table = self.correct_hinted if HINT_MARK in ids else self.correct
                right = seen % self.num_samples < table.get(key, 0)
            text = f"Answer: {key}" if right else "Answer: none"
            completions.append(Completion(response_ids=[1], logprobs=[-1.0], finish_reason="stop", text=text))
        return completions


@pytest.fixture(scope="module")
def pool():
    with RewardPool.from_config(RewardConfig(name="exact_match", num_workers=1, timeout_s=10.0)) as reward_pool:
        yield reward_pool


def _problems():
    return [
        Prompt(id="a", prompt="xx problem", answer="2", hint="two", source="s1"),
        Prompt(id="b", prompt="xxx problem", answer="3", hint="three", source="s1"),
        Prompt(id="c", prompt="xxxx problem", answer="4", source="s2"),
    ]


def test_counts_greedy_and_per_source(pool):
    engine = CountingEngine(correct={2: 3, 3: 0, 4: 5}, correct_hinted={}, greedy={2: True, 3: False, 4: True},
                            num_samples=5)  # fmt: skip
    settings = EvalSettings(num_samples=5, sampling=SamplingParams(temperature=0.7), requests_per_call=4)
    results = evaluate(engine, pool, _problems(), tokenize=tokenize, settings=settings, show_progress=False)
    by_id = results.by_id()
    assert [(by_id[i].num_samples, by_id[i].num_correct, by_id[i].greedy_correct) for i in "abc"] == [
        (5, 3, True),
        (5, 0, False),
        (5, 5, True),
    ]
    assert results.pass_at_k(1) == pytest.approx((3 / 5 + 0 + 1) / 3)
    assert results.pass_at_k(1, source="s2") == 1.0
    assert results.greedy_pass_at_1() == pytest.approx(2 / 3)
    assert sum(greedy for _, _, greedy in engine.requests) == 3  # one greedy request per problem
    assert results.meta["skipped"] == {"without_hint": 0, "too_long": 0}


def test_hinted_evaluation_counts_problems_without_hint_and_long_prompts(pool):
    engine = CountingEngine(correct={}, correct_hinted={2: 1, 3: 2}, greedy={}, num_samples=2)
    settings = EvalSettings(num_samples=2, greedy=False, with_hints=True, hint_template="{prompt} Hint: {hint}")
    results = evaluate(engine, pool, _problems(), tokenize=tokenize, settings=settings, show_progress=False)
    assert [(p.id, p.num_correct, p.greedy_correct) for p in results.problems] == [("a", 1, None), ("b", 2, None)]
    assert results.meta["skipped"] == {"without_hint": 1, "too_long": 0}
    assert all(hinted for _, hinted, _ in engine.requests)

    short = EvalSettings(num_samples=2, greedy=False, max_prompt_tokens=2)
    engine = CountingEngine(correct={2: 0, 3: 0, 4: 0}, correct_hinted={}, greedy={}, num_samples=2)
    results = evaluate(engine, pool, [*_problems(), Prompt(id="d", prompt="x", answer="1")], tokenize=tokenize,
                       settings=short, show_progress=False)  # fmt: skip
    assert [p.id for p in results.problems] == ["a", "b", "c", "d"]
    assert results.meta["skipped"]["too_long"] == 0
    long_problem = Prompt(id="e", prompt="x y z", answer="1")
    results = evaluate(engine, pool, [*_problems(), long_problem], tokenize=tokenize, settings=short,
                       show_progress=False)  # fmt: skip
    assert results.meta["skipped"]["too_long"] == 1


def test_nothing_left_is_an_error(pool):
    engine = CountingEngine(correct={}, correct_hinted={}, greedy={}, num_samples=1)
    settings = EvalSettings(num_samples=1, with_hints=True)
    with pytest.raises(ValueError, match="no problem left"):
        evaluate(engine, pool, [_problems()[2]], tokenize=tokenize, settings=settings, show_progress=False)
