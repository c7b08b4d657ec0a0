"""The hints variant of `make experiment`: what a run is judged by, and the table over arms and seeds."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("experiment", Path(__file__).parents[1] / "scripts" / "experiment.py")
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


def test_hint_summary_weighs_every_step_by_its_tokens():
    rows = [
        {"rollout/generated_tokens": 300, "guided/generated_tokens": 100, "guide/trainable_groups_per_1k_tokens": 5.0,
         "guided/num_rollouts": 8, "guided/accuracy": 0.25, "guide/num_guided_groups": 2},
        {"rollout/generated_tokens": 500, "self_hint/generated_tokens": 100,
         "guide/trainable_groups_per_1k_tokens": 0.0, "guide/num_escalated_groups": 1, "self_hint/leaks_rejected": 3},
    ]  # fmt: skip
    summary = experiment.hint_summary(rows)
    assert summary["generated_tokens"] == 1000 and summary["trainable_groups"] == 2.0
    assert summary["trainable_groups_per_1k_tokens"] == pytest.approx(2.0)
    assert summary["guided_success"] == 0.25 and summary["num_guided_groups"] == 2
    assert summary["num_escalated_groups"] == 1 and summary["leaks_rejected"] == 3 and summary["steps"] == 2


def test_hint_table_has_a_row_per_run_and_a_mean_per_arm():
    base = {"guided_success": 0.5, "generated_tokens": 100, "trainable_groups": 1, "num_guided_groups": 1,
            "num_escalated_groups": 0, "leaks_rejected": 0}  # fmt: skip
    runs = [{"arm": "graded_hints", "seed": seed, "trainable_groups_per_1k_tokens": value, **base}
            for seed, value in ((1, 2.0), (2, 4.0))]  # fmt: skip
    table = experiment.hint_table(runs)
    assert "| graded_hints | 2 | 4 | 0.5 |" in table
    assert "| **graded_hints** | 2 seeds | 3 ± 1 | 0.5 ± 0 |" in table
    assert set(experiment.HINT_ARMS) == {"fixed_hints", "graded_hints", "self_hints"}
