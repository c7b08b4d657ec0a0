"""The trainer end to end on CPU: real HF engine, real Megatron policy, real reward pool, tiny model."""

import json

import pytest

from guide_mega.config import load_config
from guide_mega.trainer import run_training


def _config(model_dir, data_path, run_dir, **overrides):
    base = {
        "model.path": str(model_dir), "model.dtype": "float32",
        "rollout.group_size": 4, "rollout.max_new_tokens": 6, "rollout.temperature": 1.0,
        "algorithm.guide.enabled": True, "algorithm.guide.drop_equal_rewards": False,
        "optimizer.lr": 0.05, "data.source": str(data_path), "data.max_prompt_tokens": 128,
        # A loaded 2-core machine can starve the reward worker for seconds (as in conftest.py's tiny_run_config): at
        # the default 5 s a timeout scores 0 and the resumed run's rewards and loss no longer match.
        "reward.name": "exact_match", "reward.lenient": True, "reward.num_workers": 1, "reward.timeout_s": 60.0,
        "train.steps": 3, "train.prompts_per_step": 2, "train.micro_batch_tokens": 512,
        "logging.run_dir": str(run_dir), "logging.progress_bar": False, "logging.tensorboard": True,
        "checkpoint.every": 1, "checkpoint.keep_last": 5,
    }  # fmt: skip
    base.update(overrides)
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in base.items()])


def _run(config):
    run_training(config)
    return [json.loads(line) for line in open(f"{config.logging.run_dir}/metrics.jsonl")]


_COMPARED = (
    "rollout/reward_mean",
    "rollout/accuracy",
    "rollout/response_length_mean",
    "loss",
    "guide/num_unsolved_groups",
)


@pytest.mark.slow
def test_resume_continues_exactly(unigram_model_dir, say_one_prompts, tmp_path):
    straight = _run(_config(unigram_model_dir, say_one_prompts, tmp_path / "straight"))
    assert [row["step"] for row in straight] == [1, 2, 3]
    assert any(row["train/skipped_step"] == 0 for row in straight)
    assert (tmp_path / "straight" / "config.yaml").exists() and list((tmp_path / "straight" / "tensorboard").iterdir())

    interrupted = _run(_config(unigram_model_dir, say_one_prompts, tmp_path / "resumed", **{"train.steps": 2}))
    resumed = _run(_config(unigram_model_dir, say_one_prompts, tmp_path / "resumed"))
    assert [row["step"] for row in interrupted + resumed[2:]] == [1, 2, 3]
    for key in _COMPARED:
        assert resumed[2].get(key) == pytest.approx(straight[2].get(key), rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_stop_file_checkpoints_after_the_step_and_a_rerun_continues(unigram_model_dir, say_one_prompts, tmp_path):
    """Preemption without signals reaching the workers (torchrun kills them ~30 s after a SIGTERM): the batch
    script writes the stop file, the run saves after its step and exits, and the requeued run resumes."""
    config = _config(unigram_model_dir, say_one_prompts, tmp_path / "run", **{"checkpoint.every": 0})
    (tmp_path / "run").mkdir()
    stop_file = tmp_path / "run" / "STOP"
    stop_file.touch()
    assert [row["step"] for row in _run(config)] == [1]
    assert not stop_file.exists() and (tmp_path / "run" / "checkpoints" / "step_1").is_dir()
    assert [row["step"] for row in _run(config)] == [1, 2, 3]
