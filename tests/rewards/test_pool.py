"""The process pool: per-sample deadlines, dead workers replaced, failures scored 0 and counted."""

import math
import os
import time

import pytest

from guide_mega.config import RewardConfig
from guide_mega.rewards.pool import DeadlinePool, RewardPool
from guide_mega.types import Prompt, Rollout, RolloutGroup


def test_deadline_pool_survives_hang_crash_and_raise():
    # Builtins pickle by reference, so the workers need no test module: sleep hangs, _exit kills, sqrt raises.
    with DeadlinePool(time.sleep, num_workers=2, timeout_s=1.0) as sleeper:
        start = time.monotonic()
        outcomes = sleeper.map([0.0, 30.0, 0.0, 0.0])
        assert time.monotonic() - start < 10
        assert [outcome.status for outcome in outcomes] == ["ok", "timeout", "ok", "ok"]
        assert sleeper.num_restarts == 1
        assert [outcome.status for outcome in sleeper.map([0.0])] == ["ok"]
    with DeadlinePool(os._exit, num_workers=1, timeout_s=5.0) as crasher:
        outcomes = crasher.map([3, 4])
        assert [outcome.status for outcome in outcomes] == ["error", "error"]
        assert "exit code 3" in outcomes[0].error
        assert crasher.num_restarts == 2
    with DeadlinePool(math.sqrt, num_workers=1, timeout_s=5.0) as raiser:
        outcomes = raiser.map([4.0, -1.0, 9.0])
        assert [outcome.value for outcome in outcomes] == [2.0, None, 3.0]
        assert outcomes[1].status == "error" and "ValueError" in outcomes[1].error


def test_reward_pool_returns_scored_copies_of_the_groups():
    prompt = Prompt(id="p0", prompt="17 + 25?", answer="42")
    responses = ["\\boxed{42}", "Answer: 41", "it is 42", "\\boxed{\\frac{84}{2}}"]
    rollouts = [
        Rollout(prompt_id="p0", sampled_prompt_ids=[1], train_prompt_ids=[1], response_ids=[2], response_text=text)
        for text in responses
    ]
    group = RolloutGroup(prompt=prompt, rollouts=rollouts)
    with RewardPool.from_config(RewardConfig(name="math", num_workers=2, timeout_s=10.0)) as pool:
        (scored,), results = pool.score_groups([group])
        assert [result.correct for result in results] == [True, False, False, True]
        assert scored.rewards == [1.0, 0.0, 0.0, 1.0]
        assert scored.success_rate == 0.5
        assert group.rewards == [0.0] * 4 and scored.prompt is prompt
        assert pool.metrics["reward/num_timeouts"] == 0.0


def test_reward_pool_counts_errors_without_crashing():
    with RewardPool.from_config(RewardConfig(name="reasoning_gym", num_workers=1)) as pool:
        results = pool.score(["Answer: 3"], ["3"], [{}])
        assert (results[0].status, results[0].reward) == ("error", 0.0)
        assert pool.metrics["reward/num_errors"] == 1.0


def test_unknown_reward_fails_at_construction():
    with pytest.raises(ValueError, match="reward.name: unknown reward .nope.; registered:"):
        RewardPool.from_config(RewardConfig(name="nope"))
