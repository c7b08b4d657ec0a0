"""A user's own reward function (`reward.name=module:function` or `file.py:function`): loaded and checked before
anything runs, scored in the deadline pool with the same counting, extra metrics into the step's metrics."""

import textwrap

import pytest

from guide_mega.config import ConfigError, RewardConfig
from guide_mega.experience import score_groups
from guide_mega.rewards import RewardPool
from guide_mega.rewards.verifiers import check_reward_name
from guide_mega.types import Prompt, Rollout, RolloutGroup

REWARD_FILE = textwrap.dedent(
    '''
    import time

    def score(prompt, response, answer, metadata):
        """1 when the response contains the answer; reports the response length and the prompt's first word."""
        extras = {"length": len(response), "asks_to_say": float(str(prompt).startswith("Say"))}
        return float(answer in response) + metadata.get("bonus", 0.0), extras

    def plain(prompt, response, answer, metadata):
        return 0.5

    def broken(prompt, response, answer, metadata):
        return "yes"

    def slow(prompt, response, answer, metadata):
        time.sleep(30)
        return 1.0

    def two_arguments(response, answer):
        return 1.0
    '''
)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def _pool(name: str, *, timeout_s: float = 60.0) -> RewardPool:
    return RewardPool.from_config(RewardConfig(name=name, num_workers=1, timeout_s=timeout_s))


def test_file_reward_scores_in_the_pool_with_prompt_and_extra_metrics(reward_file):
    with _pool(f"{reward_file}:score") as pool:
        results = pool.score(
            ["it is 4", "no idea"], ["4", "4"], [{"bonus": 0.25}, {}], prompts=["Say four.", [{"role": "user"}]]
        )
    assert [(r.reward, r.correct, r.status) for r in results] == [(1.25, True, "ok"), (0.0, False, "ok")]
    assert results[0].extras == {"length": 7.0, "asks_to_say": 1.0}
    assert results[1].extras == {"length": 7.0, "asks_to_say": 0.0}


def test_extra_metrics_are_averaged_into_the_step_metrics(reward_file):
    prompt = Prompt(id="p", prompt="Say four.", answer="4")
    rollouts = [
        Rollout(prompt_id="p", sampled_prompt_ids=[1], train_prompt_ids=[1], response_ids=[2], response_text=text)
        for text in ("4", "five")
    ]
    with _pool(f"{reward_file}:score") as pool:
        _, metrics = score_groups([RolloutGroup(prompt=prompt, rollouts=rollouts)], pool, prefix="rollout")
    values = metrics.as_dict()
    assert values["rollout/reward_extra/length"] == pytest.approx(2.5)
    assert values["rollout/reward_extra/asks_to_say"] == 1.0
    assert values["rollout/accuracy"] == 0.5


def test_module_reward_and_a_plain_number(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    with _pool("my_reward:plain") as pool:
        (result,) = pool.score(["x"], ["1"], [{}])
    # 0.5 is a reward but not full marks: not correct, so Guide would still call the group unsolved.
    assert (result.reward, result.correct, result.extras) == (0.5, False, {})


def test_bad_return_value_and_timeout_score_zero_and_are_counted(reward_file):
    with _pool(f"{reward_file}:broken") as pool:
        (result,) = pool.score(["x"], ["1"], [{}])
        assert (result.status, result.reward) == ("error", 0.0)
        assert "the reward must be a finite number, got str 'yes'" in result.error
        assert pool.metrics["reward/num_errors"] == 1.0
    with _pool(f"{reward_file}:slow", timeout_s=1.0) as pool:
        (result,) = pool.score(["x"], ["1"], [{}])
        assert (result.status, pool.metrics["reward/num_timeouts"]) == ("timeout", 1.0)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:score", "reward.name: cannot import module 'no_such_module_xyz' (No module named"),
        ("{dir}/missing.py:score", "reward.name: no such file: {dir}/missing.py"),
        ("{dir}/my_reward.py:nope", "reward.name: {dir}/my_reward.py has no function 'nope'"),
        ("{dir}/my_reward.py:two_arguments", "reward.name: two_arguments must take (prompt, response, answer"),
        ("mymodule:", "reward.name: 'mymodule:' is neither a built-in reward nor of the form"),
        ("nope", "reward.name: unknown reward 'nope'; registered:"),
    ],
)
def test_bad_reward_names_are_config_errors(reward_file, name, message):
    directory = str(reward_file.parent)
    with pytest.raises(ConfigError) as raised:
        check_reward_name(name.format(dir=directory))
    assert str(raised.value).startswith(message.format(dir=directory))


def test_a_reward_module_that_fails_to_import_is_a_config_error(tmp_path):
    (tmp_path / "bad.py").write_text("import nothing_here_xyz\n")
    with pytest.raises(ConfigError, match=r"reward.name: importing .*bad.py failed: ModuleNotFoundError"):
        check_reward_name(f"{tmp_path}/bad.py:score")


@pytest.mark.parametrize("option", ["format_gate=true", "format_bonus=0.1", "lenient=true"])
def test_built_in_answer_options_are_refused_for_an_own_function(reward_file, option):
    from guide_mega.config import load_config
    from guide_mega.preflight import check_reward

    check_reward(load_config(None, [f"reward.name={reward_file}:score"]).reward)
    key = option.partition("=")[0]
    with pytest.raises(ValueError, match=rf"^reward.{key}: applies to the built-in verifiers only; .*my_reward.py"):
        check_reward(load_config(None, [f"reward.name={reward_file}:score", f"reward.{option}"]).reward)
