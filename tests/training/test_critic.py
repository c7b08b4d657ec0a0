"""The critic: a value head on the policy's decoder, trained on the clipped value loss, read on hint-free prompts."""

import dataclasses

import pytest
import torch
from tiny_models import make_train_batch

from guide_mega.algorithms.advantages import gae_advantages


def test_critic_starts_at_zero_and_learns_the_returns(tiny_checkpoints, single_process_megatron):
    from policy_probes import critic_values_after_steps, make_critic

    critic = make_critic(tiny_checkpoints["qwen2"])
    batch = make_train_batch()
    assert torch.equal(critic.compute_values(batch), torch.zeros(batch.response_ids_T.numel()))
    losses, values_T = critic_values_after_steps(critic, batch, steps=6)
    assert losses[-1] < 0.5 * losses[0], losses
    returns_T = batch.rewards_S[batch.seq_ids_T]
    assert (values_T - returns_T).abs().mean() < (returns_T).abs().mean()


def test_critic_reads_the_hint_free_prompt(tiny_checkpoints, single_process_megatron):
    from policy_probes import critic_values_after_steps, make_critic

    critic = make_critic(tiny_checkpoints["llama"])
    batch = make_train_batch(guided_groups=(0, 1, 2, 3))
    _, values_T = critic_values_after_steps(critic, batch, steps=2)
    other_hint = dataclasses.replace(
        batch, sampled_prompt_ids=[prompt + [7, 7, 7] for prompt in batch.sampled_prompt_ids]
    )
    assert torch.equal(critic.compute_values(other_hint), values_T)
    other_prompt = dataclasses.replace(batch, train_prompt_ids=[[5] + prompt for prompt in batch.train_prompt_ids])
    assert not torch.allclose(critic.compute_values(other_prompt), values_T)


@pytest.mark.distributed
def test_parallel_critic_matches_single_process(layout_results, tiny_checkpoints, single_process_megatron):
    from policy_probes import critic_values_after_steps, make_critic

    _, expected_T = critic_values_after_steps(make_critic(tiny_checkpoints["qwen3"]), make_train_batch(), steps=2)
    results = layout_results.load("qwen3")
    torch.testing.assert_close(results["critic_values"], expected_T, atol=1e-5, rtol=1e-4)


def test_a_nonfinite_critic_step_is_skipped(tiny_checkpoints, single_process_megatron):
    """A NaN return poisons the value loss: that update is dropped (weights unchanged, counted), the next one runs."""
    from policy_probes import make_critic

    critic = make_critic(tiny_checkpoints["llama"])
    batch = make_train_batch()
    returns_T = batch.rewards_S[batch.seq_ids_T].clone()
    values_before_T = critic.compute_values(batch)
    poisoned_T = returns_T.clone()
    poisoned_T[0] = float("nan")
    metrics = critic.train(batch, returns_T=poisoned_T, old_values_T=values_before_T)
    assert metrics["critic/nonfinite_skipped"] == 1.0 and metrics["critic/update_skipped"] == 1.0
    assert torch.equal(critic.compute_values(batch), values_before_T)
    metrics = critic.train(batch, returns_T=returns_T, old_values_T=values_before_T)
    assert metrics["critic/nonfinite_skipped"] == 0.0
    assert not torch.equal(critic.compute_values(batch), values_before_T)


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


def test_gae_advantages_are_those_of_the_critics_values(tiny_checkpoints, single_process_megatron):
    """estimate_gae values the batch with the critic and returns per-token GAE advantages and returns, equal to the
    padded estimator's on the same values."""
    from policy_probes import critic_values_after_steps, make_critic

    from guide_mega.training.critic import estimate_gae

    critic = make_critic(tiny_checkpoints["qwen3"])
    batch = make_train_batch()
    old_values_T, advantages_T, returns_T, metrics = estimate_gae(critic, batch, gamma=0.9, lam=0.8)
    assert old_values_T.eq(0).all()  # the value head starts at zero
    critic_values_after_steps(critic, batch, steps=1)
    old_values_T, advantages_T, returns_T, metrics = estimate_gae(critic, batch, gamma=0.9, lam=0.8)
    assert old_values_T.abs().max() > 0
    expected_advantages_T, expected_returns_T = _independent_gae(batch, old_values_T, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages_T, expected_advantages_T)
    torch.testing.assert_close(returns_T, expected_returns_T)
    assert metrics["critic/advantage_mean"] == pytest.approx(float(advantages_T.mean()))
