"""The hints variant of `make experiment`: what a run is judged by, and the table over arms and seeds."""

import importlib.util
import subprocess
import sys
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


def test_hint_window_table_averages_each_window_over_seeds():
    def step(number, tokens, trainable, escalated):
        return {"step": number, "rollout/generated_tokens": tokens, "guide/num_escalated_groups": escalated,
                "guide/trainable_groups_per_1k_tokens": 1000 * trainable / tokens}  # fmt: skip

    runs = {
        ("graded_hints", 1): [step(1, 1000, 1, 3), step(2, 1000, 1, 1), step(3, 500, 1, 0)],
        ("graded_hints", 2): [step(1, 2000, 2, 5), step(2, 2000, 0, 1), step(3, 500, 2, 0)],
        ("fixed_hints", 1): [step(1, 1000, 2, 0), step(2, 1000, 0, 0), step(3, 1000, 1, 0)],
    }
    lines = experiment.hint_window_table(runs, 2).splitlines()
    # Seed 1's first window: 2 groups in 2,000 tokens (1.0 per 1k); seed 2's: 2 in 4,000 (0.5); mean 0.75.
    assert "| 1-2 | graded_hints | 0.75 ± 0.25 | 3000 ± 1e+03 | 0 ± 0 | 5 ± 1 |" in lines
    assert "| 3-3 | graded_hints | 3 ± 1 | 500 ± 0 | 0 ± 0 | 0 ± 0 |" in lines
    assert "| 1-2 | fixed_hints | 1 ± 0 | 2000 ± 0 | 0 ± 0 | 0 ± 0 |" in lines and len(lines) == 6


def test_a_negative_window_is_refused_before_anything_runs(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "experiment.py"
    result = subprocess.run(
        [sys.executable, str(script), "--variant", "hints", "--window", "-2", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "experiment.py: error: --window: -2 is not a number of steps (0: no such table)"
    ]
    assert not (tmp_path / "hints").exists()
