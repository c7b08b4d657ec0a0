"""A mini-batch whose loss or gradient is NaN/Inf: its optimizer step is skipped and counted, and training goes on
exactly as if it had never been there."""

import math

import pytest
from tiny_models import make_train_batch, tiny_advantages_T

from guide_mega.training.checkpoint import weight_fingerprint


@pytest.mark.parametrize("poison", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_step_is_skipped_and_training_continues(poison, tiny_checkpoints, single_process_megatron):
    from policy_probes import make_policy, train_step

    fresh = make_policy(tiny_checkpoints["llama"])
    expected = train_step(fresh, make_train_batch(seed=1))
    expected_weights = weight_fingerprint(fresh.module)

    policy = make_policy(tiny_checkpoints["llama"])
    before = weight_fingerprint(policy.module)
    poisoned = make_train_batch()
    advantages_T = tiny_advantages_T(poisoned)
    advantages_T[0] = poison
    metrics = train_step(policy, poisoned, advantages_T=advantages_T)
    assert metrics["actor/nonfinite_skipped"] == 1.0 and metrics["actor/update_skipped"] == 1.0
    assert not math.isfinite(metrics["loss"])
    assert weight_fingerprint(policy.module) == before and policy.optimizer_steps == 0

    # Adam's moments and the LR schedule saw nothing of the skipped step: the next one is a fresh policy's.
    metrics = train_step(policy, make_train_batch(seed=1))
    assert metrics["actor/nonfinite_skipped"] == 0.0 and metrics["loss"] == expected["loss"]
    assert weight_fingerprint(policy.module) == expected_weights and policy.optimizer_steps == 1
