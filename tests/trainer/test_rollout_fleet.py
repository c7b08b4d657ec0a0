"""Rollout engines on every rank group (colocated mode) under torchrun, on CPU: HF engines, real Megatron, gloo.

A run with one engine per rank must sample, score and train exactly what a run with one engine does: requests
carry their own seeds, so it does not matter which engine generated them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guide_mega.config import dump_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from torchrun_launch import run_torchrun  # noqa: E402

_SAME = (
    "rollout/reward_mean", "rollout/accuracy", "rollout/response_length_mean", "rollout/num_rollouts",
    "guide/num_unsolved_groups", "guide/num_guided_groups", "train/num_groups",
)  # fmt: skip


def _first_step(config, nproc: int) -> dict:
    path = Path(config.logging.run_dir).with_suffix(".yaml")
    dump_config(config, path)
    if nproc == 1:
        command = [sys.executable, "-m", "guide_mega.cli", "train", "--config", str(path)]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        run_torchrun(nproc, "train", "--config", str(path), module="guide_mega.cli")
    return json.loads(Path(config.logging.run_dir, "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.distributed
def test_engines_on_every_rank_sample_what_one_engine_samples(tiny_run_config):
    options = {
        "train.steps": 1,
        "train.prompts_per_step": 4,
        "checkpoint.every": 0,
        "rollout.max_new_tokens": 8,
        "rollout.check_weight_sync": True,
    }  # every engine compares its weights with the trainer's after the push
    single = _first_step(tiny_run_config("single", **options), 1)
    assert single["rollout/num_engines"] == 1.0
    for nproc in (2, 4):
        fleet = _first_step(tiny_run_config(f"fleet{nproc}", **options, **{"rollout.tensor_parallel": 1}), nproc)
        assert fleet["rollout/num_engines"] == nproc
        shares = [fleet.get(f"rollout/engine_{engine}_sequences", 0.0) for engine in range(nproc)]
        assert all(share > 0 for share in shares) and sum(shares) == fleet["rollout/num_rollouts"], shares
        for key in _SAME:
            assert fleet[key] == single[key], (nproc, key)
        assert fleet["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-7), nproc
    # rollout.tensor_parallel=2 on 2 ranks: one engine group, owned by rank 0.
    one = _first_step(tiny_run_config("one_group", **options, **{"rollout.tensor_parallel": 2}), 2)
    assert one["rollout/num_engines"] == 1.0 and one["rollout/reward_mean"] == single["rollout/reward_mean"]
