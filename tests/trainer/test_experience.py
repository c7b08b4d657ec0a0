"""The rollout stages of a step (first wave, scoring, Guide's hinted wave) and how `Trainer.step` chains them.

Sampling is scripted (a deterministic engine implementing the RolloutEngine protocol: the one boundary mocked here)
because these tests need to choose which prompts are solved; the real engines are tested in tests/rollout and end
to end in the trainer tests. Scoring goes through the real RewardPool, training through the real Megatron policy.
"""

import dataclasses

import pytest

from guide_mega.build import build_trainer
from guide_mega.config import RewardConfig
from guide_mega.experience import first_wave, hinted_wave, score_groups
from guide_mega.rewards import RewardPool
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.trainer import Trainer
from guide_mega.types import Prompt

HINT_MARK = 7  # token id the toy tokenizer gives the word 'Hint'


def tokenize(content):
    text = content if isinstance(content, str) else content[-1]["content"]
    return [HINT_MARK if word.startswith("Hint") else 100 + len(word) for word in text.split()]


class ScriptedEngine:
    """For each request, `solved(ids)` of the G samples answer `answer(ids)`, the others a wrong answer.

    It keeps each call's request count and sampling parameters: what the trainer asked of it.
    """

    def __init__(self, solved, answer, *, group_size):
        self.solved, self.answer, self.group_size = solved, answer, group_size
        self.calls = []

    def generate(self, requests, sampling, *, seeds=None):
        self.calls.append((len(requests), sampling))
        completions = []
        for index, ids in enumerate(requests):
            right = index % self.group_size < self.solved(ids)
            text = self.answer(ids) if right else "Answer: wrong"
            completions.append(Completion(response_ids=[33, 34, 216], logprobs=[-0.5] * 3, finish_reason="stop",
                                          text=text))  # fmt: skip
        return completions

    def update_weights(self, named_tensors):
        for _ in named_tensors:
            pass

    def sleep(self): ...
    def wake(self, *, parts): ...
    def close(self): ...


def _toy_engine(solved_plain, solved_hinted, group_size=4):
    """The prompt's first token names its problem (100 + letters of its first word); the answer is that number."""

    def solved(ids):
        return (solved_hinted if HINT_MARK in ids else solved_plain).get(ids[0] - 100, 0)

    return ScriptedEngine(solved, lambda ids: f"Answer: {ids[0] - 100}", group_size=group_size)


def _prompts(keys):
    return [Prompt(id=f"p{k}", prompt="x" * k + " problem", answer=str(k), hint="think") for k in keys]


@pytest.fixture(scope="module")
def reward_pool():
    with RewardPool.from_config(RewardConfig(name="exact_match", num_workers=1, timeout_s=10.0)) as pool:
        yield pool


def test_first_wave_samples_and_scores_each_prompt(reward_pool):
    engine = _toy_engine({2: 2}, {})
    sampling = dataclasses.replace(SamplingParams(), temperature=0.7, max_new_tokens=9, seed=5)
    groups, sampled = first_wave(engine, tokenize, _prompts([1, 2]), sampling=sampling, group_size=4)
    scored, rewards = score_groups(groups, reward_pool, prefix="rollout")
    assert engine.calls == [(8, sampling)]
    assert [group.success_rate for group in scored] == [0.0, 0.5]
    assert all(rollout.reward == 0.0 for group in groups for rollout in group.rollouts)  # inputs left as they were
    metrics = (sampled + rewards).as_dict()
    assert metrics["rollout/num_rollouts"] == 8 and metrics["rollout/generated_tokens"] == 24
    assert metrics["rollout/accuracy"] == pytest.approx(0.25) and metrics["time/reward_s"] >= 0


def test_hinted_wave_samples_only_unsolved_prompts_with_a_hint(reward_pool):
    engine = _toy_engine({}, {1: 3})
    prompts = _prompts([1, 2]) + [Prompt(id="p3", prompt="xxx problem", answer="3")]  # p3 has no hint
    groups, _ = first_wave(engine, tokenize, prompts, sampling=SamplingParams(), group_size=4)
    groups, _ = score_groups(groups, reward_pool, prefix="rollout")
    plan, guided, metrics = hinted_wave(
        engine, tokenize, groups, [0, 2], template="{prompt}\nHint: {hint}", sampling=SamplingParams(), group_size=4
    )
    assert plan.group_indices == [0] and plan.without_hint == [2] and engine.calls[-1][0] == 4
    (wave,), _ = score_groups(guided, reward_pool, prefix="guided")
    assert [rollout.correct for rollout in wave.rollouts] == [True, True, True, False]
    plain_ids, hinted_ids = tokenize("x problem"), tokenize("x problem\nHint: think")
    assert all(r.train_prompt_ids == plain_ids and r.sampled_prompt_ids == hinted_ids for r in wave.rollouts)
    assert metrics.as_dict()["guided/num_rollouts"] == 4


def _say_one_trainer(tiny_run_config, run_name, solved_by_prompt, **overrides):
    """A real trainer (tiny policy, reward pool, loader) whose engine answers prompt i right `solved(i)` times of
    G, '1' being right: the outcomes are chosen by the test, the rest of the step is the real one."""
    trainer = build_trainer(tiny_run_config(run_name, **overrides))
    tokenize = trainer.rollout.tokenize
    by_ids = {}
    for index in range(8):
        plain, hinted = f"Say one ({index}).", f"Say one ({index}).\nHint: It is small."
        by_ids[tuple(tokenize(plain))], by_ids[tuple(tokenize(hinted))] = solved_by_prompt(index)
    engine = ScriptedEngine(lambda ids: by_ids[tuple(ids)], lambda ids: "1", group_size=4)
    rollout = dataclasses.replace(trainer.rollout, engine=engine)
    rebuilt = Trainer(trainer.config, policy=trainer.policy, critic=None, rollout=rollout, engines=trainer.engines,
                      run_log=trainer.run_log)  # fmt: skip
    return rebuilt, engine


def test_metrics_of_every_filter_round_add_up(tiny_run_config):
    """Guide and Filter-GRPO together (the 32B/72B configs): a second sampling round must not overwrite the first
    round's guide/ and guided/ metrics. Prompts are served in file order: 0 and 1 in round one, 2 in round two."""
    # (plain, hinted) correct samples of 4: prompt 0 unsolved then 2/4 with its hint; prompt 1 all right (dropped
    # by the filter); prompt 2 unsolved then 1/4 with its hint.
    outcomes = {0: (0, 2), 1: (4, 0), 2: (0, 1)}
    trainer, engine = _say_one_trainer(
        tiny_run_config, "rounds", lambda index: outcomes.get(index, (0, 0)),
        **{"algorithm.filter_groups": True, "algorithm.max_filter_rounds": 2, "data.shuffle": False},
    )  # fmt: skip
    try:
        metrics = trainer.step()
    finally:
        trainer.close()
    assert [count for count, _ in engine.calls] == [8, 4, 4, 4]  # round 1: 2 prompts + 1 hinted; round 2: 1 + 1
    assert metrics["filter/rounds"] == 2 and metrics["train/num_groups"] == 2
    assert metrics["filter/num_groups_dropped"] == 1
    assert metrics["guide/num_unsolved_groups"] == 2 and metrics["guide/num_guided_groups"] == 2
    assert metrics["guide/guided_groups_solved"] == 2
    assert metrics["guided/accuracy"] == pytest.approx(3 / 8)
    assert metrics["guide/guided_success_rate"] == pytest.approx(3 / 8)
    assert metrics["rollout/num_rollouts"] == 12 and metrics["rollout/accuracy"] == pytest.approx(4 / 12)
    assert metrics["train/skipped_step"] == 0.0 and metrics["actor/off_policy_tokens"] > 0


def test_a_step_with_no_signal_skips_training_and_says_so(tiny_run_config):
    trainer, _ = _say_one_trainer(tiny_run_config, "nothing", lambda index: (0, 0), **{"algorithm.filter_groups": True})
    try:
        metrics = trainer.step()
    finally:
        trainer.close()
    assert metrics["train/skipped_step"] == 1.0 and metrics["train/num_groups"] == 0
    # Four rounds (the default max_filter_rounds) of two unsolved prompts whose hinted waves fail as well.
    assert metrics["filter/rounds"] == 4 and metrics["guide/num_unsolved_groups"] == 8
    assert metrics["guide/num_guided_groups"] == 8 and metrics["filter/num_groups_dropped"] == 8
