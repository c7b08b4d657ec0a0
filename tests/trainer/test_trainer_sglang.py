"""The trainer with separate SGLang servers (rollout.engine=sglang, rollout.sglang_urls): rollouts come from two real
SGLang CPU servers behind one client, and updated weights reach both after every step over one gloo weight group
(rollout.sglang_weight_group), checked by rollout.check_weight_sync. Marked `sglang` (`make test-sglang`)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from guide_mega.evaluation.metrics_file import read_metrics
from guide_mega.rollout.sglang_server import LocalSGLangServer, free_port
from guide_mega.trainer import run_training
from tests.rollout.test_sglang_server import sglang_venv

pytestmark = pytest.mark.sglang


def test_guide_steps_against_two_real_sglang_servers(tiny_run_config, unigram_model_dir, tmp_path):
    servers = [
        LocalSGLangServer(sglang_venv(), unigram_model_dir, log_path=tmp_path / f"server{index}.log")
        for index in range(2)
    ]
    # The pool's threads start the servers and outlive them: a server gets SIGTERM when the thread that started it
    # ends (LocalSGLangServer sets PR_SET_PDEATHSIG, which follows the starting thread).
    with ThreadPoolExecutor(len(servers)) as pool:
        try:
            list(pool.map(LocalSGLangServer.start, servers))
            config = tiny_run_config(
                "sglang_run", **{"rollout.engine": "sglang", "rollout.sglang_urls": [server.url for server in servers],
                                 "rollout.sglang_weight_group": f"127.0.0.1:{free_port()}",
                                 "rollout.check_weight_sync": True, "train.colocate": False, "train.steps": 3,
                                 "checkpoint.every": 0}
            )  # fmt: skip
            run_training(config)
        finally:
            for server in servers:
                server.stop()
    rows = read_metrics(tmp_path / "sglang_run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(row["train/skipped_step"] == 0.0 for row in rows[:2])
    # Both servers sample every step.
    for row in rows:
        assert row["rollout/engine_0_sequences"] > 0 and row["rollout/engine_1_sequences"] > 0, row
        assert row["rollout/num_engines"] == 2.0, row
    # The servers sample with the weights the trainer just pushed: their logprobs match the trainer's
    # recomputation after updates too (a missed update would leave a server on older weights and open this gap).
    for row in rows[1:]:
        assert row["rollout/trainer_logprob_abs_diff_max"] < 1e-3, row
