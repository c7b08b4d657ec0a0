"""The words at the end of a run: the algorithm's name and sentences computed from the run's own metrics."""

import json

import pytest

from guide_mega.config import load_config
from guide_mega.run_report import algorithm_label, describe_run


def _config(**overrides):
    values = {"logging.run_dir": "runs/demo", "rollout.group_size": 8, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ({}, "GRPO"),
        ({"algorithm.filter_groups": True}, "Filter-GRPO"),
        ({"algorithm.guide.enabled": True}, "Guide-GRPO"),
        ({"algorithm.guide.enabled": True, "algorithm.filter_groups": True}, "Guide-GRPO + filter"),
        ({"algorithm.estimator": "gae"}, "PPO"),
        ({"algorithm.estimator": "gae", "algorithm.guide.enabled": True}, "Guide-PPO"),
    ],
)
def test_algorithm_label(overrides, label):
    assert algorithm_label(_config(**overrides).algorithm) == label


def test_a_guide_run_is_told_from_its_numbers():
    step = {
        "rollout/num_rollouts": 64.0, "guide/num_unsolved_groups": 7.0, "guide/num_guided_groups": 6.0,
        "guide/guided_groups_solved": 4.0, "guide/num_unsolved_without_hint": 1.0, "train/num_groups": 5.0,
        "filter/num_groups_dropped": 3.0, "rollout/num_groups_with_variance": 1.0,
    }  # fmt: skip
    config = _config(**{"algorithm.guide.enabled": True, "algorithm.filter_groups": True})
    assert describe_run([step, step], config).splitlines() == [
        "In 2 steps the first wave sampled 16 prompts; 14 of them were unsolved (no correct answer in 8 tries).",
        "Guide sampled 12 of them again with the hint in the prompt, and the hint rescued 8 (at least one correct "
        "answer in 8 hinted tries); 2 had no hint.",
        "The policy trained on 10 groups, after Filter-GRPO dropped 6 without reward variance.",
        "Plain GRPO would have had 2 groups with a learning signal out of 16: a group whose rewards are all equal "
        "(all wrong or all right) has advantages 0.",
        "Plots: runs/demo/curves.png; rollout samples (prompt, hint, response, reward): runs/demo/samples.jsonl; "
        "every metric: runs/demo/metrics.jsonl.",
    ]


def test_when_every_group_is_unsolved_plain_grpo_had_no_group():
    step = {"rollout/num_rollouts": 16.0, "guide/num_unsolved_groups": 2.0, "rollout/num_groups_with_variance": 0.0}
    lines = describe_run([step], _config(**{"algorithm.guide.enabled": True})).splitlines()
    assert lines[1] == (
        "Plain GRPO would have had no group with a learning signal out of 2: a group whose rewards are all equal "
        "(all wrong or all right) has advantages 0."
    )


def test_a_filter_grpo_run_counts_its_zero_variance_groups():
    step = {
        "rollout/num_rollouts": 32.0, "train/num_groups": 1.0, "filter/num_groups_dropped": 3.0,
        "rollout/num_groups_with_variance": 1.0,
    }  # fmt: skip
    config = _config(**{"algorithm.filter_groups": True, "logging.samples_per_step": 0})
    lines = describe_run([step], config).splitlines()
    assert lines == [
        "In 1 step the first wave sampled 4 prompts.",
        "The policy trained on 1 group, after Filter-GRPO dropped 3 without reward variance.",
        "Plain GRPO would have had 1 group with a learning signal out of 4: a group whose rewards are all equal (all "
        "wrong or all right) has advantages 0.",
        "Plots: runs/demo/curves.png; every metric: runs/demo/metrics.jsonl.",
    ]
