"""Resume after SIGKILL: a real `guide-mega train` process is killed in the middle of a step and restarted.

The killed run (checkpoint.every=1) dies, process group and all, while step k + 1 runs, after step k's checkpoint
is complete; restarted with checkpoint.resume=auto it must log the same later steps (rollouts, rewards, tokens,
loss) and end with the same weights as a run that was never interrupted. Both runs are real subprocesses (HF
engine, Megatron policy, reward pool) on the tiny unigram model of conftest.py, one thread each.

Where the kill lands does not depend on the machine's speed: every run scores with the fixture's exact_match reward
through a reward file, which in the killed run's first launch alone holds step k + 1's scoring (the reward worker
waits, so the step cannot end) until the kill.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guide_mega.config import dump_config
from guide_mega.training.checkpoint import list_checkpoints

KILLED_AFTER_STEP = 1
STEPS = 3
_TIMEOUT_S = 240
# Set for the killed run's first launch alone: the reward holds once this checkpoint exists (so in the next step),
# after touching the file named by _HELD_ENV.
_HOLD_AFTER_ENV = "GUIDE_MEGA_TEST_HOLD_AFTER"
_HELD_ENV = "GUIDE_MEGA_TEST_HELD"
REWARD = f"""
import os
import time
from pathlib import Path

from guide_mega.rewards.results import RewardOptions
from guide_mega.rewards.verifiers import exact_match_reward

OPTIONS = RewardOptions(lenient=True)


def held_exact_match(prompt, response, answer, metadata):
    hold_after = os.environ.get({_HOLD_AFTER_ENV!r})
    if hold_after and Path(hold_after).exists():
        Path(os.environ[{_HELD_ENV!r}]).touch()
        while True:  # until the test kills the run (past reward.timeout_s the step would go on, and the test fail)
            time.sleep(0.1)
    # A quarter point for an odd number of 2s (the tiny model writes 1s, 2s and spaces): groups the exact match
    # leaves all wrong still differ, so the compared steps train (a gradient of 0 would compare no update), and only
    # exact matches count as correct.
    return exact_match_reward(response, answer=answer, metadata=metadata, options=OPTIONS).reward + 0.25 * (
        response.count("2") % 2
    )
"""
# Per-step metrics that must match: what was sampled, how it scored, and what the update did.
_COMPARED = (
    "rollout/reward_mean",
    "rollout/accuracy",
    "rollout/response_length_mean",
    "rollout/num_rollouts",
    "guide/num_unsolved_groups",
    "guide/num_guided_groups",
    "guide/guided_success_rate",
    "train/num_groups",
    "loss",
    "actor/grad_norm",
)


def _start(config, name: str, **extra_env: str) -> tuple[subprocess.Popen, Path]:
    """`python -m guide_mega.cli train` on `config` in its own process group; output goes to <run_dir>.log."""
    run_dir = Path(config.logging.run_dir)
    config_path, log_path = run_dir.with_suffix(".yaml"), run_dir.with_suffix(f".{name}.log")
    dump_config(config, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **extra_env}
    for key in (_HOLD_AFTER_ENV, _HELD_ENV):
        if key not in extra_env:
            env.pop(key, None)
    command = [sys.executable, "-m", "guide_mega.cli", "train", "--config", str(config_path)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, log_path


def _finish(process: subprocess.Popen, log_path: Path) -> None:
    try:
        code = process.wait(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert code == 0, f"training exited with {code}:\n{log_path.read_text()[-6000:]}"


def _kill_during_next_step(process: subprocess.Popen, log_path: Path, checkpoint_root: Path, held: Path) -> None:
    """SIGKILL the whole process group once step KILLED_AFTER_STEP's checkpoint is written and the next step's
    scoring is held (`held` exists)."""
    saved = re.compile(rf"^checkpoint: .*step_{KILLED_AFTER_STEP}$", re.MULTILINE)
    deadline = time.monotonic() + _TIMEOUT_S
    while not (saved.search(log_path.read_text()) and held.exists()):
        assert process.poll() is None, f"training ended before the kill:\n{log_path.read_text()[-6000:]}"
        assert time.monotonic() < deadline, f"no checkpoint and held step within the timeout (held: {held.exists()})"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    completed = [path.name for path in list_checkpoints(checkpoint_root)]
    assert completed == [f"step_{KILLED_AFTER_STEP}"], f"the kill did not land in step {KILLED_AFTER_STEP + 1}"


def _metrics(config) -> list[dict]:
    return [json.loads(line) for line in open(Path(config.logging.run_dir) / "metrics.jsonl")]


def _final_weights(config) -> dict[str, torch.Tensor]:
    export = Path(config.logging.run_dir) / "checkpoints" / f"step_{STEPS}" / "hf"
    return {name: t for path in sorted(export.glob("*.safetensors")) for name, t in load_file(path).items()}


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_matches_the_uninterrupted_run(tiny_run_config, tmp_path):
    reward_file = tmp_path / "held_reward.py"
    reward_file.write_text(REWARD)
    # exact_match (plus parity credit) through the reward file in every run (lenient inside it: reward.lenient is
    # for the built-ins); 40-token responses, as before the hold, so the compared steps are the same as they were.
    options = {
        "train.steps": STEPS, "checkpoint.every": 1, "checkpoint.export_hf": True, "rollout.max_new_tokens": 40,
        "reward.name": f"{reward_file}:held_exact_match", "reward.lenient": False,
    }  # fmt: skip
    straight, killed = tiny_run_config("straight", **options), tiny_run_config("killed", **options)
    checkpoint_root, held = Path(killed.logging.run_dir) / "checkpoints", tmp_path / "held"
    hold = {_HOLD_AFTER_ENV: str(checkpoint_root / f"step_{KILLED_AFTER_STEP}"), _HELD_ENV: str(held)}
    # Both first launches run side by side (one thread each) to halve the wall time.
    straight_process, straight_log = _start(straight, "first")
    killed_process, killed_log = _start(killed, "first", **hold)
    try:
        _kill_during_next_step(killed_process, killed_log, checkpoint_root, held)
        resumed_process, resumed_log = _start(killed, "resumed")
        _finish(resumed_process, resumed_log)
    finally:
        if killed_process.poll() is None:
            os.killpg(killed_process.pid, signal.SIGKILL)
        _finish(straight_process, straight_log)
    assert f"step_{KILLED_AFTER_STEP}" in resumed_log.read_text()  # "resumed from .../step_1 at step 1"

    expected, resumed = _metrics(straight), _metrics(killed)
    assert [row["step"] for row in resumed] == [row["step"] for row in expected] == list(range(1, STEPS + 1))
    # Each compared step updates the weights (its loss may be 0: equal lengths, advantages summing to 0 at ratio 1).
    assert all(row["actor/grad_norm"] > 0 for row in expected[KILLED_AFTER_STEP:]), "a compared step trained nothing"
    for want, got in zip(expected[KILLED_AFTER_STEP:], resumed[KILLED_AFTER_STEP:], strict=True):
        for key in _COMPARED:  # a mean over nothing (no guided sample) is absent from both
            assert (key in got) == (key in want), (got["step"], key)
            assert got.get(key, 0.0) == pytest.approx(want.get(key, 0.0), rel=1e-5, abs=1e-7), (got["step"], key)
    expected_weights, resumed_weights = _final_weights(straight), _final_weights(killed)
    assert expected_weights.keys() == resumed_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
