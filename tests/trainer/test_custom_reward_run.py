"""A training run with the user's own reward function (a file): it scores the rollouts in the reward pool and its
extra metrics reach the step's metrics.jsonl."""

import json

from guide_mega.trainer import run_training

REWARD = '''
def says_one(prompt, response, answer, metadata):
    """1 when the response contains the answer; reports the response length and the prompt's length."""
    return float(answer in response), {"response_chars": len(response), "prompt_chars": len(prompt)}
'''


def test_own_reward_function_trains_and_logs_its_extra_metrics(tiny_run_config, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(REWARD)
    overrides = {"reward.name": f"{reward_file}:says_one", "reward.lenient": False, "train.steps": 1}
    config = tiny_run_config("own_reward", **overrides, **{"checkpoint.every": 0})
    run_training(config)
    (row,) = [json.loads(line) for line in (tmp_path / "own_reward" / "metrics.jsonl").read_text().splitlines()]
    assert row["reward/num_errors"] == 0 and row["reward/num_timeouts"] == 0
    assert row["rollout/reward_extra/prompt_chars"] == len("Say one (0).")  # the hint-free prompt, as the data gave it
    assert row["rollout/reward_extra/response_chars"] > 0
    # A reward of 1 is correct, 0 is not: accuracy and mean reward agree, and the unigram policy says '1' sometimes.
    assert row["rollout/accuracy"] == row["rollout/reward_mean"] > 0.0
