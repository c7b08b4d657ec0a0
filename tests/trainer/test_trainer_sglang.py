"""The trainer with a separate SGLang server (rollout.engine=sglang, rollout.sglang_url): rollouts come from a real
SGLang CPU server, updated weights reach it after every step. Marked `sglang` (`make test-sglang`)."""

import pytest

from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.rollout.sglang_server import LocalSGLangServer
from guide_mega.trainer import run_training
from tests.rollout.test_sglang_server import sglang_venv

pytestmark = pytest.mark.sglang


def test_guide_steps_against_a_real_sglang_server(tiny_run_config, unigram_model_dir, tmp_path):
    with LocalSGLangServer(sglang_venv(), unigram_model_dir, log_path=tmp_path / "server.log") as server:
        config = tiny_run_config(
            "sglang_run", **{"rollout.engine": "sglang", "rollout.sglang_url": server.url, "train.colocate": False,
                             "train.steps": 3, "checkpoint.every": 0}
        )  # fmt: skip
        run_training(config)
    rows = read_metrics(tmp_path / "sglang_run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(row["train/skipped_step"] == 0.0 for row in rows[:2])
    # The server samples with the weights the trainer just pushed: its logprobs match the trainer's recomputation
    # after updates too (a missed update would leave the server on older weights and open this gap).
    for row in rows[1:]:
        assert row["rollout/trainer_logprob_abs_diff_max"] < 1e-3, row
