"""PPO and Guide-PPO in the trainer: critic values -> per-token GAE -> policy step -> critic step, on CPU.

Real HF engine, real Megatron policy and critic, real reward pool, the tiny unigram model of conftest.py.
"""

import json

import pytest
import torch

from guide_mega.build import build_trainer
from guide_mega.trainer import run_training

_PPO = {
    "algorithm.estimator": "gae",
    "algorithm.gae_gamma": 0.9,
    "algorithm.gae_lambda": 0.8,
    "optimizer.critic_lr": 0.01,
}


@pytest.mark.slow
def test_guide_ppo_steps_train_policy_and_critic_on_gae_advantages(tiny_run_config):
    config = tiny_run_config("ppo", **_PPO)
    trainer = build_trainer(config)
    try:
        critic_before = {name: p.detach().clone() for name, p in trainer.critic.runner.module.named_parameters()}
        trainer.run_log.begin(0)
        trainer.fit()
    finally:
        trainer.run_log.close()
        trainer.close()

    critic_after = trainer.critic.runner.module.named_parameters()
    changed = [name for name, param in critic_after if not torch.equal(param, critic_before[name])]
    assert any(name.startswith("value_head") for name in changed) and any("decoder" in name for name in changed)
    rows = [json.loads(line) for line in open(f"{config.logging.run_dir}/metrics.jsonl")]
    assert rows[0]["critic/old_value_mean"] == 0.0  # the value head starts at zero ...
    assert rows[1]["critic/old_value_mean"] != 0.0  # ... and the second step sees what the first one learned
    expected = {"loss", "critic/loss", "critic/value_mean", "critic/grad_norm", "critic/advantage_mean",
                "critic/return_mean", "critic/nonfinite_skipped", "time/values_s", "time/critic_train_s",
                "guide/num_unsolved_groups"}  # fmt: skip
    for row in rows:
        assert expected <= row.keys(), expected - row.keys()
        assert row["train/skipped_step"] == 0
    assert any(row.get("guide/num_guided_groups", 0) > 0 for row in rows), "no guided group: Guide-PPO untested"
    critic_root = trainer.checkpoint_root() / "critic"
    assert sorted(path.name for path in critic_root.iterdir()) == ["step_1", "step_2"]


@pytest.mark.slow
def test_ppo_resume_restores_the_critic(tiny_run_config):
    straight = tiny_run_config("straight", **_PPO)
    run_training(straight)
    run_training(tiny_run_config("resumed", **_PPO, **{"train.steps": 1}))
    resumed = tiny_run_config("resumed", **_PPO)
    run_training(resumed)
    rows = {
        name: [json.loads(line) for line in open(f"{config.logging.run_dir}/metrics.jsonl")]
        for name, config in (("straight", straight), ("resumed", resumed))
    }
    assert [row["step"] for row in rows["resumed"]] == [1, 2]
    for key in ("loss", "critic/loss", "critic/old_value_mean", "critic/advantage_mean", "rollout/reward_mean"):
        assert rows["resumed"][1][key] == pytest.approx(rows["straight"][1][key], rel=1e-5, abs=1e-7), key
