"""Policy, value and KL losses against hand-computed values and an explicit importance-weighted gradient."""

import math

import pytest
import torch

from guide_mega.algorithms.losses import (
    PolicyLossOptions,
    aggregate_loss,
    combine_token_losses,
    kl_penalty,
    masked_quantile,
    policy_loss,
    shaping_gamma,
    value_loss,
)


def _loss_and_grad(ratios, advantages, *, guided=False, options=None, gamma=None):
    """Per-token loss and d(loss)/d(logprob) for given ratios (old logprob 0)."""
    logprobs_T = torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_()
    advantages_T = torch.tensor(advantages, dtype=torch.float64).expand(len(ratios))
    mask_T = torch.ones(len(ratios), dtype=torch.bool)
    guided_T = torch.full((len(ratios),), guided)
    loss_T, metrics = policy_loss(
        logprobs_T, torch.zeros_like(logprobs_T), advantages_T, mask_T, guided_T,
        options=options or PolicyLossOptions(), gamma=gamma,
    )  # fmt: skip
    loss_T.sum().backward()
    return loss_T.detach(), logprobs_T.grad, metrics


def test_ppo_clip_boundaries_positive_advantage():
    ratios = [0.7, 0.8, 1.0, 1.2, 1.3]
    loss, grad, metrics = _loss_and_grad(ratios, 1.0)
    torch.testing.assert_close(loss, torch.tensor([-0.7, -0.8, -1.0, -1.2, -1.2], dtype=torch.float64))
    # d(-r)/dlogprob = -r while unclipped; the clipped branch (r > 1.2) has no gradient.
    torch.testing.assert_close(grad, torch.tensor([-0.7, -0.8, -1.0, -1.2, 0.0], dtype=torch.float64))
    assert metrics["actor/clip_frac_high"].item() == pytest.approx(1 / 5)
    assert metrics["actor/clip_frac_low"].item() == 0.0


def test_ppo_clip_boundaries_negative_advantage():
    ratios = [0.7, 0.8, 1.0, 1.3]
    loss, grad, metrics = _loss_and_grad(ratios, -1.0)
    torch.testing.assert_close(loss, torch.tensor([0.8, 0.8, 1.0, 1.3], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.8, 1.0, 1.3], dtype=torch.float64))
    assert metrics["actor/clip_frac_low"].item() == pytest.approx(1 / 4)


def test_clip_higher_lets_large_ratios_through():
    loss, grad, _ = _loss_and_grad([1.25], 1.0, options=PolicyLossOptions(clip_low=0.2, clip_high=0.28))
    torch.testing.assert_close(loss, torch.tensor([-1.25], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-1.25], dtype=torch.float64))


def test_dual_clip_caps_negative_advantage_loss():
    options = PolicyLossOptions(dual_clip=3.0)
    loss, grad, metrics = _loss_and_grad([5.0, 2.0], -1.0, options=options)
    torch.testing.assert_close(loss, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert metrics["actor/dual_clip_frac"].item() == pytest.approx(0.5)
    # Positive advantages are never dual-clipped.
    loss, _, _ = _loss_and_grad([5.0], 1.0, options=options)
    torch.testing.assert_close(loss, torch.tensor([-1.2], dtype=torch.float64))


def test_masked_quantile_excludes_padding():
    values_T = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 100.0])
    mask_T = torch.tensor([True, True, True, True, False, False])
    assert masked_quantile(values_T, mask_T, 0.5).item() == pytest.approx(2.5)
    assert masked_quantile(values_T, mask_T, 0.9).item() == pytest.approx(3.7)
    assert math.isnan(masked_quantile(values_T, torch.zeros(6, dtype=torch.bool), 0.5).item())


@pytest.mark.parametrize("q", [0.0, 0.37, 0.9, 1.0])
def test_masked_quantile_matches_torch_quantile_on_random_values(q):
    generator = torch.Generator().manual_seed(7)
    for size in (1, 2, 5, 1000):
        values_T = torch.randn(size, dtype=torch.float64, generator=generator)
        mask_T = torch.rand(size, generator=generator) < 0.7
        mask_T[0] = True
        expected = torch.quantile(values_T[mask_T], q)
        assert masked_quantile(values_T, mask_T, q).item() == pytest.approx(expected.item(), abs=1e-12)


def test_masked_quantile_is_exact_beyond_torch_quantiles_size_limit():
    """A large step has more guided tokens than torch.quantile accepts (2^24); gamma must still be exact."""
    size = (1 << 24) + 1001  # torch.quantile raises "input tensor is too large" from 2^24 + 1 values on
    # A permutation of 0..size-1 (7919 is prime and does not divide size), scaled to the grid k / (size - 1).
    values_T = (torch.arange(size, dtype=torch.int64) * 7919 % size).double() / (size - 1)
    mask_T = torch.ones(size, dtype=torch.bool)
    # The values are the grid k / (size - 1): their linearly interpolated q-quantile is q itself.
    assert masked_quantile(values_T, mask_T, 0.9).item() == pytest.approx(0.9, abs=1e-12)
    assert masked_quantile(values_T.float(), mask_T, 0.25).dtype == torch.float32


def test_shaping_with_masked_quantile_gamma():
    ratios = torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6, 9.0, 9.0], dtype=torch.float64)
    logprobs_T = ratios.log().requires_grad_()
    mask_T = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)  # the 9.0 ratios are padding
    advantages_T = torch.full((7,), 2.0, dtype=torch.float64)
    options = PolicyLossOptions(off_policy="shaping")
    loss_T, metrics = policy_loss(
        logprobs_T, torch.zeros(7, dtype=torch.float64), advantages_T, mask_T, torch.ones(7, dtype=torch.bool),
        options=options, gamma_quantile=0.5,
    )  # fmt: skip
    gamma = 0.4  # median of the five unpadded ratios; the authors' unmasked median would be 0.8
    assert metrics["guide/shaping_gamma"].item() == pytest.approx(gamma)
    r = ratios[:5]
    torch.testing.assert_close(loss_T[:5].detach(), -2.0 * r / (r + gamma))
    assert loss_T[5:].eq(0).all()
    loss_T.sum().backward()
    torch.testing.assert_close(logprobs_T.grad[:5], -2.0 * gamma * r / (r + gamma) ** 2)
    assert logprobs_T.grad[5:].eq(0).all()


def test_shaping_gamma_constant_and_floor():
    ratios_T = torch.full((4,), 1e-9)
    mask_T = torch.ones(4, dtype=torch.bool)
    assert shaping_gamma(ratios_T, mask_T, quantile=0.9).item() == pytest.approx(1e-4)
    assert shaping_gamma(ratios_T, mask_T, quantile=None, constant=0.1).item() == pytest.approx(0.1)


def test_guided_clip_truncated_is_and_none():
    clip = PolicyLossOptions(off_policy="clip", off_policy_clip_low=0.5, off_policy_clip_high=0.5)
    loss, grad, _ = _loss_and_grad([0.1, 1.0, 2.0], 1.0, guided=True, options=clip)
    torch.testing.assert_close(loss, torch.tensor([-0.1, -1.0, -1.5], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-0.1, -1.0, 0.0], dtype=torch.float64))
    tis = PolicyLossOptions(off_policy="truncated_is", truncated_is_cap=1.5)
    loss, grad, _ = _loss_and_grad([0.1, 1.0, 2.0], 2.0, guided=True, options=tis)
    torch.testing.assert_close(loss, torch.tensor([-0.2, -2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-0.2, -2.0, -3.0], dtype=torch.float64))
    loss, grad, _ = _loss_and_grad([0.1, 3.0], -1.0, guided=True, options=PolicyLossOptions(off_policy="none"))
    torch.testing.assert_close(loss, torch.tensor([0.1, 3.0], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0.1, 3.0], dtype=torch.float64))


def _toy_policy_logprobs(theta_CV, context_C, targets_T):
    """A log-linear toy policy: logits = context @ theta + a per-position offset; log pi of each target."""
    positions_TC = context_C + 0.1 * torch.arange(targets_T.numel(), dtype=torch.float64)[:, None]
    return torch.log_softmax(positions_TC @ theta_CV, dim=-1).gather(1, targets_T[:, None]).squeeze(1)


@pytest.mark.parametrize("off_policy", ["none", "clip", "truncated_is"])
def test_guide_gradient_is_importance_weighted_policy_gradient(off_policy):
    """Where no clip is active: grad L = -sum_t A_t r_t grad log pi(o_t | q), r_t = pi(.|q) / pi_old(.|q,h)."""
    theta_CV = (0.1 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
    hint_free_C = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    hinted_C = torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
    targets_T = torch.tensor([0, 3, 1, 4])
    old_logprobs_T = _toy_policy_logprobs(theta_CV.detach() + 0.05, hinted_C, targets_T)  # behaviour: hinted context
    logprobs_T = _toy_policy_logprobs(theta_CV, hint_free_C, targets_T)
    advantages_T = torch.tensor([1.5, 1.5, -0.5, -0.5], dtype=torch.float64)
    options = PolicyLossOptions(
        off_policy=off_policy, off_policy_clip_low=0.99, off_policy_clip_high=100.0, truncated_is_cap=100
    )
    loss_T, _ = policy_loss(
        logprobs_T, old_logprobs_T, advantages_T, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool),
        options=options,
    )  # fmt: skip
    (grad_loss,) = torch.autograd.grad(loss_T.sum(), theta_CV, retain_graph=True)
    ratios_T = torch.exp(logprobs_T - old_logprobs_T).detach()
    expected = torch.zeros_like(theta_CV)
    for t in range(4):
        (grad_logp,) = torch.autograd.grad(logprobs_T[t], theta_CV, retain_graph=True)
        expected -= advantages_T[t] * ratios_T[t] * grad_logp
    torch.testing.assert_close(grad_loss, expected)


@pytest.mark.parametrize("off_policy", ["shaping", "clip", "truncated_is", "none"])
def test_no_guided_tokens_reduces_to_ppo(off_policy):
    logprobs_T = torch.randn(50, dtype=torch.float64) * 0.3 - 1
    old_logprobs_T = logprobs_T + torch.randn(50, dtype=torch.float64) * 0.3
    advantages_T = torch.randn(50, dtype=torch.float64)
    mask_T = torch.rand(50) > 0.2
    not_guided_T = torch.zeros(50, dtype=torch.bool)
    loss_T, _ = policy_loss(
        logprobs_T, old_logprobs_T, advantages_T, mask_T, not_guided_T, options=PolicyLossOptions(off_policy=off_policy)
    )
    ratio_T = torch.exp(logprobs_T - old_logprobs_T)
    ppo_T = torch.maximum(-advantages_T * ratio_T, -advantages_T * ratio_T.clamp(0.8, 1.2)) * mask_T
    torch.testing.assert_close(loss_T, ppo_T)


def test_aggregation_modes_hand_computed():
    loss_T = torch.tensor([1.0, 3.0, 5.0, 100.0])
    mask_T = torch.tensor([True, True, True, False])
    seq_ids_T = torch.tensor([0, 0, 1, 1])
    assert aggregate_loss(loss_T, mask_T, seq_ids_T, mode="token_mean").item() == pytest.approx(3.0)
    assert aggregate_loss(loss_T, mask_T, seq_ids_T, mode="seq_mean_token_mean").item() == pytest.approx(3.5)
    assert aggregate_loss(loss_T, mask_T, seq_ids_T, mode="seq_mean_token_sum").item() == pytest.approx(4.5)
    scaled = aggregate_loss(loss_T, mask_T, seq_ids_T, mode="seq_mean_token_sum", token_sum_scale=3.0)
    assert scaled.item() == pytest.approx(1.5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregation_is_independent_of_micro_batch_split(mode):
    lengths = [3, 7, 2, 5]
    loss_T = torch.randn(sum(lengths), dtype=torch.float64)
    mask_T = torch.rand(sum(lengths)) > 0.3
    mask_T[0] = mask_T[3] = mask_T[10] = mask_T[12] = True  # every sequence keeps a token
    seq_ids_T = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    full = aggregate_loss(loss_T, mask_T, seq_ids_T, mode=mode)
    totals = dict(global_num_tokens=float(mask_T.sum()), global_num_seqs=4.0)
    split = 10  # sequences 0-1 in the first micro-batch, 2-3 in the second
    first = aggregate_loss(loss_T[:split], mask_T[:split], seq_ids_T[:split], mode=mode, **totals)
    second = aggregate_loss(loss_T[split:], mask_T[split:], seq_ids_T[split:] - 2, mode=mode, **totals)
    torch.testing.assert_close(first + second, full)


def test_kl_estimators_hand_computed():
    logprobs_T = torch.tensor([math.log(0.5)], dtype=torch.float64)
    ref_T = torch.tensor([math.log(0.25)], dtype=torch.float64)
    d = math.log(2.0)
    assert kl_penalty(logprobs_T, ref_T, estimator="k1").item() == pytest.approx(d)
    assert kl_penalty(logprobs_T, ref_T, estimator="k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logprobs_T, ref_T, estimator="k3").item() == pytest.approx(0.5 - 1 + d)
    assert kl_penalty(ref_T, ref_T, estimator="k3").item() == 0.0


def test_kl_k3_is_unbiased_for_true_kl():
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_penalty(p.log()[samples], q.log()[samples], estimator="k3").mean()
    assert estimate.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_value_loss_clipping():
    values_T = torch.tensor([1.0, 0.0, 0.5])
    old_T = torch.tensor([0.0, 0.0, 0.4])
    returns_T = torch.tensor([2.0, 1.0, 0.0])
    loss_T, clipped_T = value_loss(values_T, old_T, returns_T, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    torch.testing.assert_close(loss_T, torch.tensor([1.62, 0.5, 0.125]))
    assert clipped_T.tolist() == [True, False, False]
    unclipped_T, _ = value_loss(values_T, old_T, returns_T, clip=None)
    torch.testing.assert_close(unclipped_T, torch.tensor([0.5, 0.5, 0.125]))


def test_combine_token_losses():
    pg_T, kl_T, ent_T = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 4.0])
    total_T = combine_token_losses(pg_T, kl_T=kl_T, kl_coef=0.1, entropy_T=ent_T, entropy_coef=0.01)
    torch.testing.assert_close(total_T, torch.tensor([1.03, 2.01]))


def test_extreme_log_ratio_stays_finite():
    loss, grad, _ = _loss_and_grad([math.exp(200.0)], 1.0, guided=True, options=PolicyLossOptions(off_policy="none"))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
