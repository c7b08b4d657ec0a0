"""The rollout stages of a step (first wave, scoring, Guide's hinted wave) and how `Trainer.step` chains them.

Sampling is scripted (a deterministic engine implementing the RolloutEngine protocol: the one boundary mocked here)
because these tests need to choose which prompts are solved; the real engines are tested in tests/rollout and end
to end in the trainer tests. Scoring goes through the real RewardPool, training through the real Megatron policy.
"""

import dataclasses
import json

import pytest

from guide_mega.algorithms.guide import plan_hints
from guide_mega.build import build_trainer
from guide_mega.config import RewardConfig
from guide_mega.experience import first_wave, guided_waves, hinted_wave, score_groups, self_written_hints
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
    assert metrics["rollout/num_groups_with_variance"] == 1  # the half-solved group; the unsolved one has none


def test_hinted_wave_samples_only_unsolved_prompts_with_a_hint(reward_pool):
    engine = _toy_engine({}, {1: 3})
    prompts = _prompts([1, 2]) + [Prompt(id="p3", prompt="xxx problem", answer="3")]  # p3 has no hint
    groups, _ = first_wave(engine, tokenize, prompts, sampling=SamplingParams(), group_size=4)
    groups, _ = score_groups(groups, reward_pool, prefix="rollout")
    plan = plan_hints(groups, [0, 2], template="{prompt}\nHint: {hint}")
    guided, metrics = hinted_wave(engine, tokenize, groups, plan, sampling=SamplingParams(), group_size=4)
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


def _graded_prompts(keys):
    return [Prompt(id=f"p{k}", prompt="x" * k + " problem", answer=str(k), hint=["weak", "strong hint"]) for k in keys]


def _graded_toy_engine(plain, by_level, group_size=4):
    """Correct samples per problem key: `plain[key]` without a hint, `by_level[level][key]` with the hint of that
    level (the level is the number of words after 'Hint:' minus one)."""

    def solved(ids):
        if HINT_MARK not in ids:
            return plain.get(ids[0] - 100, 0)
        level = len(ids) - ids.index(HINT_MARK) - 2
        return by_level[level].get(ids[0] - 100, 0)

    return ScriptedEngine(solved, lambda ids: f"Answer: {ids[0] - 100}", group_size=group_size)


@pytest.mark.parametrize("max_extra_waves", [1, 0])
def test_guided_waves_escalate_a_failed_wave_one_level_within_the_step(reward_pool, max_extra_waves):
    # Level 0: p1 fails, p2 half right, p3 (starting at level 1, the strongest) fails. Level 1: p1 3 of 4.
    engine = _graded_toy_engine({}, {0: {2: 2}, 1: {1: 3}})
    groups, _ = first_wave(engine, tokenize, _graded_prompts([1, 2, 3]), sampling=SamplingParams(), group_size=4)
    groups, _ = score_groups(groups, reward_pool, prefix="rollout")
    plan, guided, metrics = guided_waves(
        engine, tokenize, reward_pool, groups, [0, 1, 2], template="{prompt}\nHint: {hint}", levels={"p3": 1},
        max_extra_waves=max_extra_waves, sampling=SamplingParams(), group_size=4,
    )  # fmt: skip
    values = metrics.as_dict()
    assert plan.group_indices == [0, 1, 2] and list(guided) == [0, 1, 2]
    if max_extra_waves:
        assert [count for count, _ in engine.calls] == [12, 12, 4]  # the extra wave: p1 only, one level up
        assert plan.levels == [1, 0, 1] and guided[0].success_rate == 0.75
        assert plan.prompts[0] == "x problem\nHint: strong hint"
        assert values["guide/num_escalated_groups"] == 1 and values["guide/level1_groups"] == 2
        assert guided[0].prompt.hint == "strong hint"  # the group records the hint it was sampled with
        assert values["guided/num_rollouts"] == 16 and values["guided/generated_tokens"] == 48  # in the budget
        assert values["guide/level1_success_rate"] == pytest.approx(3 / 8)
    else:
        assert [count for count, _ in engine.calls] == [12, 12]
        assert plan.levels == [0, 0, 1] and guided[0].success_rate == 0.0
        assert values["guide/num_escalated_groups"] == 0 and values["guide/level1_groups"] == 1
    assert values["guide/level0_groups"] == 2 and values["guide/level0_success_rate"] == pytest.approx(2 / 8)
    assert guided[1].success_rate == 0.5 and all(r.is_guided for r in guided[1].rollouts)
    assert [{r.hint_level for r in guided[index].rollouts} for index in plan.group_indices] == [
        {level} for level in plan.levels
    ]  # each guided rollout knows the level it was sampled at
    assert {r.hint_level for group in groups for r in group.rollouts} == {-1}


def _graded_trainer(tiny_run_config, tmp_path, run_name, outcomes):
    """A real trainer over two problems with two hint levels each, whose engine answers right `outcomes[(problem,
    level)]` times of 4 ('plain': no hint); `outcomes` may change between steps."""
    path = tmp_path / "graded.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Say one ({i}).", "answer": "1", "hint": ["It is a number.", "It is small."]}
            for i in range(2)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = {"data.source": str(path), "data.shuffle": False, "algorithm.guide.levels.adaptive": True}
    trainer = build_trainer(tiny_run_config(run_name, **overrides))
    tokenize = trainer.rollout.tokenize
    contexts = {}
    for index, row in enumerate(rows):
        contexts[tuple(tokenize(row["prompt"]))] = (index, "plain")
        for level, hint in enumerate(row["hint"]):
            contexts[tuple(tokenize(f"{row['prompt']}\nHint: {hint}"))] = (index, level)
    engine = ScriptedEngine(lambda ids: outcomes.get(contexts[tuple(ids)], 0), lambda ids: "1", group_size=4)
    rollout = dataclasses.replace(trainer.rollout, engine=engine)
    rebuilt = Trainer(trainer.config, policy=trainer.policy, critic=None, rollout=rollout, engines=trainer.engines,
                      run_log=trainer.run_log)  # fmt: skip
    return rebuilt, engine


def _step(trainer):
    metrics = trainer.step()
    trainer.step_index += 1
    return metrics


def test_hint_levels_escalate_settle_resume_exactly_and_fall_when_solved_without_a_hint(tiny_run_config, tmp_path):
    # q0: fails without a hint and at level 0, half right at level 1; q1: always right at level 0 (stays at 0).
    outcomes = {(0, 1): 2, (1, 0): 4}
    trainer, engine = _graded_trainer(tiny_run_config, tmp_path, "graded", outcomes)
    try:
        first = _step(trainer)
        assert [count for count, _ in engine.calls] == [8, 8, 4]  # q0 escalated within the step
        assert first["guide/num_escalated_groups"] == 1 and first["guide/level1_success_rate"] == 0.5
        assert dict(trainer.rollout.loader.hint_levels) == {"q0": 1}
        reliance = {key for key in first if key.endswith("hint_reliance")}
        assert reliance == {"guide/hint_reliance", "guide/level0_hint_reliance", "guide/level1_hint_reliance"}
        per_level = (first["guide/level0_hint_reliance"], first["guide/level1_hint_reliance"])
        assert first["guide/hint_reliance"] == pytest.approx(sum(per_level) / 2, rel=1e-5)  # 4 samples at each
        second = _step(trainer)
        assert [count for count, _ in engine.calls[3:]] == [8, 8]  # q0 starts at level 1: no extra wave
        assert second["guide/level1_groups"] == 1 and second["guide/level0_groups"] == 1
        # 48 tokens generated (both waves); q1's all-right guided group has no reward variance: one group trains.
        assert second["guide/trainable_groups_per_1k_tokens"] == pytest.approx(1000 / 48)
        checkpoint = trainer.save()
        resumed, resumed_engine = _graded_trainer(tiny_run_config, tmp_path, "graded_resumed", outcomes)
        try:
            resumed.resume(checkpoint)
            assert resumed.rollout.loader.state_dict() == trainer.rollout.loader.state_dict()
            outcomes[(0, "plain")] = 1  # q0 is now solved without its hint: its level falls back to 0
            after, after_resume = _step(trainer), _step(resumed)
            assert [count for count, _ in resumed_engine.calls] == [count for count, _ in engine.calls[5:]] == [8, 4]
            assert dict(trainer.rollout.loader.hint_levels) == dict(resumed.rollout.loader.hint_levels) == {}
            for key in ("guide/num_guided_groups", "guide/level0_success_rate", "rollout/accuracy", "loss"):
                assert after_resume[key] == pytest.approx(after[key], rel=1e-5), key
            assert "guide/level1_hint_reliance" not in after  # only q1 is guided, at level 0
            assert after["guide/level0_hint_reliance"] == pytest.approx(after["guide/hint_reliance"], rel=1e-6)
        finally:
            resumed.close()
    finally:
        trainer.close()


class HintWriter:
    """An engine whose i-th completion of a call is texts[i]; it keeps each call's requests, sampling and seeds."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, requests, sampling, *, seeds=None):
        self.calls.append((requests, sampling, seeds))
        return [Completion(response_ids=[1, 2], logprobs=[-1.0, -1.0], finish_reason="stop", text=text)
                for text in self.texts[: len(requests)]]  # fmt: skip


def test_self_written_hints_are_leak_checked_cached_and_graded(reward_pool):
    prompts = [Prompt(id="p1", prompt="x problem", answer="1"), *_prompts([2]),
               Prompt(id="p3", prompt="xxx problem", answer="3")]  # fmt: skip
    groups, _ = first_wave(_toy_engine({3: 4}, {}), tokenize, prompts, sampling=SamplingParams(), group_size=4)
    groups, _ = score_groups(groups, reward_pool, prefix="rollout")
    writer = HintWriter(["Count the letters.", "The answer is 1."])  # level 1 states the answer
    sampling = dataclasses.replace(SamplingParams(), seed=5)
    hinted, written, metrics = self_written_hints(
        writer, tokenize, groups, [0, 1], {}, sampling=sampling, max_new_tokens=16
    )
    (requests, used, seeds), = writer.calls  # fmt: skip
    assert len(requests) == 2 and used.max_new_tokens == 16 and len(set(seeds)) == 2  # only p1: p2 has a hint
    assert written == {("p1", 0): "Count the letters.", ("p1", 1): None}
    assert hinted[0].prompt.hint == ["Count the letters."] and groups[0].prompt.hint is None  # input untouched
    assert hinted[1] is groups[1] and hinted[2] is groups[2]
    counts = {key: value for key, value in metrics.as_dict().items() if key.startswith("self_hint/")}
    assert counts == {"self_hint/num_written": 1, "self_hint/leaks_rejected": 1, "self_hint/cache_hits": 0,
                      "self_hint/generated_tokens": 4}  # fmt: skip
    again, new, cached = self_written_hints(writer, tokenize, groups, [0, 1], written, sampling=sampling,
                                            max_new_tokens=16)  # fmt: skip
    assert len(writer.calls) == 1 and new == {} and again[0].prompt.hint == ["Count the letters."]
    assert cached.as_dict()["self_hint/cache_hits"] == 2


@pytest.mark.parametrize("teacher_coef", [0.5, 0.0])
def test_the_hint_teacher_term_teaches_the_failed_hint_free_samples_of_pooled_groups(tiny_run_config, teacher_coef):
    """merge=pool keeps the failed hint-free samples beside the guided ones; with teacher_coef > 0 each of their
    tokens gets the teacher term (under its group's hinted prompt), and none otherwise."""
    trainer, _ = _say_one_trainer(
        tiny_run_config, f"teacher{teacher_coef}", lambda index: (0, 2),
        **{"algorithm.guide.merge": "pool", "algorithm.guide.teacher_coef": teacher_coef},
    )  # fmt: skip
    try:
        metrics = trainer.step()
    finally:
        trainer.close()
    assert metrics["guide/num_guided_groups"] == 2 and metrics["train/skipped_step"] == 0.0
    if teacher_coef:
        assert metrics["actor/teacher_tokens"] == 2 * 4 * 3  # 2 groups x 4 failed samples x 3 response tokens
        # The unigram model ignores its context, so the hinted and hint-free logprobs agree: no gap to teach.
        assert metrics["actor/teacher_kl"] == pytest.approx(0.0, abs=1e-5)
    else:
        assert "actor/teacher_tokens" not in metrics and "actor/teacher_kl" not in metrics


def test_self_written_hints_through_the_trainer_are_written_once_and_guide_the_wave(tiny_run_config, tmp_path):
    """hint_source=self on problems without hints: the engine writes each problem's hints in the first step (two
    levels each), the hinted wave samples under them, and the next step takes them from the loader's cache."""
    path = tmp_path / "no_hints.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Say one ({i}).", "answer": "1"} for i in range(2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = build_trainer(
        tiny_run_config("self", **{"data.source": str(path), "algorithm.guide.hint_source": "self"})
    )
    tokenize = trainer.rollout.tokenize
    hinted = {tuple(tokenize(f"{row['prompt']}\nHint: It is small.")) for row in rows}
    plain = {tuple(tokenize(row["prompt"])) for row in rows}
    # Hint-free: all wrong; hinted: 2 of 4 right; any other request is a hint to write: 'It is small.'
    solved = lambda ids: 0 if tuple(ids) in plain else 2 if tuple(ids) in hinted else 4  # noqa: E731
    writes = lambda ids: "1" if tuple(ids) in hinted else "It is small."  # noqa: E731
    engine = ScriptedEngine(solved, writes, group_size=4)
    rollout = dataclasses.replace(trainer.rollout, engine=engine)
    trainer = Trainer(trainer.config, policy=trainer.policy, critic=None, rollout=rollout, engines=trainer.engines,
                      run_log=trainer.run_log)  # fmt: skip
    try:
        first, second = _step(trainer), _step(trainer)
    finally:
        trainer.close()
    assert first["self_hint/num_written"] == 4 and first["self_hint/leaks_rejected"] == 0
    assert first["guide/num_guided_groups"] == 2 and first["guide/guided_success_rate"] == 0.5
    assert first["guide/num_unsolved_without_hint"] == 0 and first["self_hint/generated_tokens"] == 12
    assert second["self_hint/cache_hits"] == 4 and second["self_hint/num_written"] == 0
    assert [count for count, _ in engine.calls] == [8, 4, 8, 8, 8]  # step 1: wave, 4 hints, hinted; step 2: no hints
    assert set(trainer.rollout.loader.self_hints.values()) == {"It is small."}
