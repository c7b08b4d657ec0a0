"""The console side of a run's log: one line per step when output is redirected (or the bar is off), the current
phase on the bar on a terminal; and the samples a step hands it."""

import json

import pytest

from guide_mega import run_log as run_log_module
from guide_mega.config import load_config
from guide_mega.rollout_samples import sample_rows
from guide_mega.run_log import RunLog, step_line
from guide_mega.types import Prompt, Rollout, RolloutGroup

ROW = {
    "step": 3, "time": 0.0, "rollout/reward_mean": 0.125, "guide/num_unsolved_groups": 5.0,
    "guide/guided_success_rate": 0.375, "loss": -0.0123456, "perf/rollout_tokens_per_s": 45.4,
    "time/rollout_s": 12.34, "time/reward_s": 0.5, "time/old_logprobs_s": 1.0, "time/train_s": 5.25,
    "time/weight_sync_s": 0.4, "time/engine_wake_s": 0.001, "time/step_s": 19.5, "actor/entropy": 0.7,
}  # fmt: skip


def _config(tmp_path, **overrides):
    values = {"logging.run_dir": str(tmp_path / "run"), "logging.tensorboard": False, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def test_a_step_line_has_the_headline_metrics_and_every_phase_time():
    assert step_line(3, 10, ROW) == (
        "step 3/10 | reward 0.125 | unsolved 5 | guided success 0.375 | loss -0.01235 | tok/s 45 | "
        "rollout 12.3s reward 0.5s old_logprobs 1.0s train 5.2s weight_sync 0.4s | step 19.5s"
    )
    # A metric the step did not log (no Guide: no unsolved count) is left out, never shown as 0.
    assert step_line(1, 2, {"rollout/reward_mean": 0.5, "guide/guided_success_rate": None}) == (
        "step 1/2 | reward 0.500"
    )


@pytest.mark.parametrize("progress_bar", [True, False])
def test_redirected_output_or_no_bar_prints_one_line_per_step(tmp_path, capsys, progress_bar):
    # Under pytest stdout is not a terminal: the bar switches itself off, as in a Slurm log.
    log = RunLog(tmp_path / "run", _config(tmp_path, **{"logging.progress_bar": progress_bar}), total_steps=2)
    log.begin(0)
    log.phase("rollout")
    log.message("checkpoint: somewhere")
    log.log(1, {key: value for key, value in ROW.items() if key not in ("step", "time")})
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["checkpoint: somewhere", step_line(1, 2, log.rows[0])]
    assert out[1].startswith("step 1/2 | reward 0.125 | unsolved 5 |")


def test_on_a_terminal_the_bar_names_the_running_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_log_module, "_on_terminal", lambda: True)
    log = RunLog(tmp_path / "run", _config(tmp_path), total_steps=2)
    log.begin(0)
    log.phase("old_logprobs")
    assert "guide-mega [old logprobs]" in capsys.readouterr().err
    log.log(1, {"rollout/reward_mean": 0.5})
    log.phase("checkpoint")
    assert "guide-mega [checkpoint]" in capsys.readouterr().err
    log.close()
    captured = capsys.readouterr()
    assert captured.out == ""  # no step lines beside a bar
    final = captured.err.split("\r")[-1]
    assert final.startswith("guide-mega:  50%") and "reward=0.5" in final, final  # 1 of 2 steps; no phase named


def test_a_step_hands_its_groups_and_the_log_writes_samples_and_counts_refusals(tmp_path):
    prompt = Prompt(id="q", prompt="Say one.", answer="1", hint="small")
    rollouts = [
        Rollout(prompt_id="q", sampled_prompt_ids=[1], train_prompt_ids=[1], response_ids=[2], response_text=text)
        for text in ("one", "two", "three")
    ]
    group = RolloutGroup(prompt=prompt, rollouts=rollouts)
    line_bytes = max(len(json.dumps(row, ensure_ascii=False)) + 1 for row in sample_rows(1, [group], 2))
    cap_mb = 2.5 * line_bytes / 2**20  # room for step 1's two rows, not for step 2's
    config = _config(tmp_path, **{"logging.samples_per_step": 2, "logging.samples_max_mb": cap_mb})
    log = RunLog(tmp_path / "run", config, total_steps=2)
    log.begin(0)
    for step in (1, 2):
        log.samples(step, [group])
        log.log(step, {"loss": 0.1})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(row["step"], row["response"]) for row in rows] == [(1, "one"), (1, "two")]
    assert [row["samples/num_not_written"] for row in log.rows] == [0.0, 2.0]
