"""PPO and Guide-PPO in the trainer: critic values -> per-token GAE -> policy step -> critic step, on CPU.

Real HF engine, real Megatron policy and critic, real reward pool, the tiny unigram model of conftest.py.
"""

import json

import pytest
import torch

from guide_mega.algorithms.advantages import gae_advantages
from guide_mega.trainer import build_trainer, run_training

_PPO = {
    "algorithm.estimator": "gae",
    "algorithm.gae_gamma": 0.9,
    "algorithm.gae_lambda": 0.8,
    "optimizer.critic_lr": 0.01,
}


def _independent_gae(batch, values_T, *, gamma, lam):
    """GAE through the padded estimator, with rewards placed and rows padded by hand (not the trainer's path)."""
    bounds = batch.cu_seqlens_S1.tolist()
    width = max(end - start for start, end in zip(bounds, bounds[1:], strict=False))
    rewards_BT, values_BT, mask_BT = (torch.zeros(batch.num_seqs, width) for _ in range(3))
    for row, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        values_BT[row, : end - start] = values_T[start:end]
        mask_BT[row, : end - start] = 1
        if end > start:
            rewards_BT[row, end - start - 1] = batch.rewards_S[row]
    advantages_BT, returns_BT = gae_advantages(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    return advantages_BT[mask_BT.bool()], returns_BT[mask_BT.bool()]


def _record_steps(trainer):
    """Wrap the critic and the policy so that each step's values, advantages and critic targets are kept."""
    records = []
    compute_values, critic_train = trainer.critic.compute_values, trainer.critic.train
    policy_train = trainer.policy.train

    def values_spy(batch):
        values_T = compute_values(batch)
        records.append({"values_T": values_T.clone()})
        return values_T

    def policy_spy(batch):
        records[-1].update(batch=batch, advantages_T=batch.advantages_T.clone())
        return policy_train(batch)

    def critic_spy(batch, *, returns_T, old_values_T):
        records[-1].update(returns_T=returns_T.clone(), old_values_T=old_values_T.clone())
        return critic_train(batch, returns_T=returns_T, old_values_T=old_values_T)

    trainer.critic.compute_values, trainer.policy.train, trainer.critic.train = values_spy, policy_spy, critic_spy
    return records


@pytest.mark.slow
def test_guide_ppo_steps_train_policy_and_critic_on_gae_advantages(tiny_run_config):
    config = tiny_run_config("ppo", **_PPO)
    trainer = build_trainer(config)
    try:
        records = _record_steps(trainer)
        critic_before = {name: p.detach().clone() for name, p in trainer.critic.runner.module.named_parameters()}
        trainer.run_log.begin(0)
        trainer.fit()
    finally:
        trainer.run_log.close()
        trainer.close()

    critic_after = trainer.critic.runner.module.named_parameters()
    changed = [name for name, param in critic_after if not torch.equal(param, critic_before[name])]
    assert any(name.startswith("value_head") for name in changed) and any("decoder" in name for name in changed)
    assert len(records) == 2
    assert records[0]["values_T"].eq(0).all()  # the value head starts at zero
    assert records[1]["values_T"].abs().max() > 0  # ... and the second step sees what the first one learned
    for record in records:
        advantages_T, returns_T = _independent_gae(record["batch"], record["values_T"], gamma=0.9, lam=0.8)
        torch.testing.assert_close(record["advantages_T"], advantages_T)
        torch.testing.assert_close(record["returns_T"], returns_T)
        assert torch.equal(record["old_values_T"], record["values_T"])

    rows = [json.loads(line) for line in open(f"{config.logging.run_dir}/metrics.jsonl")]
    expected = {"loss", "critic/loss", "critic/value_mean", "critic/grad_norm", "critic/advantage_mean",
                "critic/return_mean", "time/values_s", "time/critic_train_s", "guide/num_unsolved_groups"}  # fmt: skip
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
