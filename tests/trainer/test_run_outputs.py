"""What `guide-mega train` and `guide-mega eval` leave for a person to read, through the real entry point in a
subprocess on the tiny unigram Llama: a line per step when output goes to a file, samples.jsonl, the closing
sentences computed from the run's own metrics, the curves, and eval's generations.jsonl; and, in process, the phases
a step reports to the progress bar."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guide_mega.config import dump_config, load_config
from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.run_log import step_line
from guide_mega.run_report import describe_run

GUIDE_MEGA = str(Path(sys.executable).parent / "guide-mega")
STEPS = 2


def _run(*args: str) -> subprocess.CompletedProcess:
    # Pipes, not a terminal: the bar switches itself off, as in a Slurm log.
    return subprocess.run([GUIDE_MEGA, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_prints_a_line_per_step_writes_samples_and_says_what_happened(tiny_run_config, tmp_path):
    overrides = {"train.steps": STEPS, "logging.samples_per_step": 6, "checkpoint.every": 0}
    config = tiny_run_config("run", **overrides, **{"logging.progress_bar": True})  # the bar is off by itself
    config_path = tmp_path / "train.yaml"
    dump_config(config, config_path)

    result = _run("train", "--config", str(config_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(config.logging.run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = result.stdout.splitlines()
    assert [line for line in out if line.startswith("step ") and " | " in line] == [
        step_line(row["step"], STEPS, row) for row in rows
    ]
    first = next(line for line in out if line.startswith("step 1/"))
    assert "| rollout " in first and first.endswith("s") and "| step " in first, first  # phase times, then the step's

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [1] * 6 + [2] * 6
    assert {row["finish_reason"] for row in samples} <= {"stop", "length"}
    guided = [row for row in samples if row["guided"]]
    assert all(row["hint"] == "It is small." for row in guided)
    assert all(row["hint"] is None for row in samples if not row["guided"])
    if any(row.get("guide/num_guided_groups") for row in rows):
        assert guided, "guided groups come first in the sample"

    story = describe_run(rows, load_config(run_dir / "config.yaml"))
    assert result.stdout.endswith(story)
    prompts = round(sum(row["rollout/num_rollouts"] for row in rows)) // config.rollout.group_size
    unsolved = round(sum(row["guide/num_unsolved_groups"] for row in rows))
    assert story.startswith(f"In {STEPS} steps the first wave sampled {prompts} prompts; {unsolved} of them")
    assert story in (run_dir / "summary.md").read_text()
    assert (run_dir / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_eval_writes_every_generation(tiny_run_config, unigram_model_dir, tmp_path):
    config_path = tmp_path / "eval.yaml"
    dump_config(tiny_run_config("eval"), config_path)
    output = tmp_path / "out"
    result = _run(
        "eval", "--checkpoint", str(unigram_model_dir), "--config", str(config_path), "--samples", "2", "--k", "1,2",
        "--hints", "both", "--limit", "3", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name, hint in (("generations.jsonl", None), ("generations_hinted.jsonl", "It is small.")):
        rows = [json.loads(line) for line in (output / name).read_text().splitlines()]
        assert len(rows) == 3 * (2 + 1)  # 3 problems x (2 samples + the greedy answer)
        assert sum(row["greedy"] for row in rows) == 3
        assert {row["hint"] for row in rows} == {hint}
        assert {row["prompt_id"] for row in rows} == {"q0", "q1", "q2"}


def test_a_step_reports_each_phase_as_it_enters_it(tiny_run_config, monkeypatch):
    """What the progress bar names during a step, in DESIGN §2's order."""
    from guide_mega.build import build_trainer
    from guide_mega.run_log import RunLog

    phases = []
    monkeypatch.setattr(RunLog, "phase", lambda self, name: phases.append(name))
    trainer = build_trainer(tiny_run_config("phases", **{"train.steps": 1}))
    try:
        trainer.run_log.begin(0)
        trainer.step()
    finally:
        trainer.run_log.close()
        trainer.close()
    main = ["rollout", "guide wave", "old_logprobs", "train", "weight_sync"]
    assert [phase for phase in phases if phase in main] == main
