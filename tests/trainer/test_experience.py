"""Collecting a step's experience: first wave, Guide's second wave, Filter-GRPO oversampling.

Sampling is scripted here (a deterministic engine implementing the RolloutEngine protocol) because these tests need
to choose which prompts are solved; the real engines are tested in tests/rollout and end to end in the trainer test.
Scoring goes through the real RewardPool.
"""

from dataclasses import replace

import pytest

from guide_mega.config import AlgorithmConfig, GuideConfig, RewardConfig
from guide_mega.experience import ExperienceCollector
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.types import Prompt

HINT_MARK = 7  # token id our toy tokenizer gives the word 'Hint'


def tokenize(content):
    text = content if isinstance(content, str) else content[-1]["content"]
    return [HINT_MARK if word.startswith("Hint") else 100 + len(word) for word in text.split()]


class ScriptedEngine:
    """Answers with `solved_plain[i]` correct samples per group for hint-free prompts and `solved_hinted` with a hint.

    The prompt's first token identifies its answer (100 + number of letters of the first word).
    """

    def __init__(self, *, solved_plain, solved_hinted, group_size):
        self.solved_plain, self.solved_hinted, self.group_size = solved_plain, solved_hinted, group_size
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append(len(requests))
        completions = []
        for index, ids in enumerate(requests):
            key = ids[0] - 100
            hinted = HINT_MARK in ids
            solved = (self.solved_hinted if hinted else self.solved_plain).get(key, 0)
            answer = f"Answer: {key}" if index % self.group_size < solved else "Answer: wrong"
            completions.append(
                Completion(response_ids=[1, 2, 3], logprobs=[-0.5] * 3, finish_reason="stop", text=answer)
            )
        return completions

    def update_weights(self, named_tensors): ...
    def sleep(self): ...
    def wake(self): ...
    def close(self): ...


def _prompts(keys):
    return [Prompt(id=f"p{k}", prompt="x" * k + " problem", answer=str(k), hint="think") for k in keys]


@pytest.fixture(scope="module")
def reward_pool():
    with RewardPool.from_config(RewardConfig(name="exact_match", num_workers=1, timeout_s=10.0)) as pool:
        yield pool


def _collector(engine, pool, **algorithm):
    algorithm = AlgorithmConfig(**algorithm)
    return ExperienceCollector(engine, pool, tokenize, algorithm=algorithm, sampling=SamplingParams(), group_size=4)


def _feeder(keys):
    prompts = _prompts(keys)

    def next_prompts(count):
        taken = prompts[:count]
        del prompts[:count]
        return taken

    return next_prompts


def test_guide_replace_second_wave_only_for_unsolved(reward_pool):
    engine = ScriptedEngine(solved_plain={2: 2}, solved_hinted={1: 3}, group_size=4)
    guide = GuideConfig(enabled=True, merge="replace")
    experience = _collector(engine, reward_pool, guide=guide).collect(_feeder([1, 2]), 2)
    assert engine.calls == [8, 4]  # first wave for both prompts, second wave for the unsolved one only
    unsolved, mixed = experience.groups
    assert unsolved.is_guided and not mixed.is_guided
    assert [r.correct for r in unsolved.rollouts] == [True, True, True, False]
    plain_ids, hinted_ids = tokenize("x problem"), tokenize("x problem\nHint: think")
    assert all(r.train_prompt_ids == plain_ids and r.sampled_prompt_ids == hinted_ids for r in unsolved.rollouts)
    metrics = experience.metrics
    assert metrics["guide/num_unsolved_groups"] == 1 and metrics["guide/guided_groups_solved"] == 1
    assert metrics["guided/accuracy"] == pytest.approx(0.75)
    assert experience.num_generated_tokens == 12 * 3


def test_guide_pool_and_dropping_uninformative_guided_groups(reward_pool):
    engine = ScriptedEngine(solved_plain={}, solved_hinted={1: 2, 2: 0}, group_size=4)
    guide = GuideConfig(enabled=True, merge="pool")
    experience = _collector(engine, reward_pool, guide=guide).collect(_feeder([1, 2]), 2)
    pooled, failed = experience.groups
    assert len(pooled.rollouts) == 8 and sum(r.is_guided for r in pooled.rollouts) == 4
    assert not failed.is_guided  # its guided wave was 0/4: dropped, counted
    assert experience.metrics["guide/num_guided_groups_dropped"] == 1


def test_guide_disabled_is_one_wave(reward_pool):
    engine = ScriptedEngine(solved_plain={}, solved_hinted={1: 4}, group_size=4)
    experience = _collector(engine, reward_pool).collect(_feeder([1, 2]), 2)
    assert engine.calls == [8] and not any(g.is_guided for g in experience.groups)


def test_filter_grpo_oversamples_until_full(reward_pool):
    # Prompts 1 and 3 are all-correct, 2 and 4 mixed: the first round keeps one of two, the second fills the batch.
    engine = ScriptedEngine(solved_plain={1: 4, 2: 1, 3: 4, 4: 2}, solved_hinted={}, group_size=4)
    experience = _collector(engine, reward_pool, filter_zero_variance=True).collect(_feeder([1, 2, 3, 4]), 2)
    assert [g.prompt.id for g in experience.groups] == ["p2", "p4"]
    assert engine.calls == [8, 4, 4]
    assert experience.metrics["filter/num_groups_dropped"] == 2 and experience.metrics["filter/partial_batch"] == 0


def test_filter_grpo_cap_gives_partial_batch(reward_pool):
    engine = ScriptedEngine(solved_plain={k: 4 for k in range(1, 9)}, solved_hinted={}, group_size=4)
    collector = _collector(engine, reward_pool, filter_zero_variance=True, max_filter_rounds=2)
    experience = collector.collect(_feeder(range(1, 9)), 2)
    assert experience.groups == [] and experience.metrics["filter/partial_batch"] == 1
    assert experience.metrics["filter/rounds"] == 2


def test_sampling_params_are_passed_through(reward_pool):
    engine = ScriptedEngine(solved_plain={1: 1}, solved_hinted={}, group_size=4)
    seen = []
    original = engine.generate
    engine.generate = lambda requests, sampling: seen.append(sampling) or original(requests, sampling)
    sampling = replace(SamplingParams(), temperature=0.7, max_new_tokens=9)
    collector = ExperienceCollector(engine, reward_pool, tokenize, algorithm=AlgorithmConfig(), sampling=sampling,
                                    group_size=4)  # fmt: skip
    collector.collect(_feeder([1]), 1)
    assert seen == [sampling]
