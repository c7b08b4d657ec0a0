"""policy_loss kernels against guide_mega.algorithms.losses.policy_loss: values and autograd gradients."""

import math

import pytest
import torch

from guide_mega.algorithms.losses import PolicyLossOptions
from guide_mega.algorithms.losses import policy_loss as losses_policy_loss
from guide_mega.kernels import policy_loss, policy_loss_with_grad
from guide_mega.kernels.policy_loss import OFF_POLICY_MODES, policy_loss_reference

IMPLS = ("triton", "torch", "reference")


def make_batch(num_tokens, device, *, seed=0):
    """Logprobs with log-ratios spread over [-1, 1] (both clip sides hit), signed advantages, masks, flags."""
    generator = torch.Generator().manual_seed(seed)
    old_logprobs_T = -torch.rand(num_tokens, generator=generator) * 5.0
    logprobs_T = old_logprobs_T + (torch.rand(num_tokens, generator=generator) * 2.0 - 1.0)
    advantages_T = torch.randn(num_tokens, generator=generator)
    loss_mask_T = torch.rand(num_tokens, generator=generator) > 0.2
    is_guided_T = torch.rand(num_tokens, generator=generator) > 0.5
    upstream_T = torch.randn(num_tokens, generator=generator)
    batch = (logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, upstream_T)
    return tuple(t.to(device) for t in batch)


def loss_and_grad(compute, logprobs_T, upstream_T):
    logprobs_T = logprobs_T.detach().clone().requires_grad_()
    loss_T = compute(logprobs_T)
    loss_T.backward(upstream_T)
    return loss_T.detach(), logprobs_T.grad


def assert_matches_losses(batch, options, gamma, impl, *, rtol=1e-5, atol=1e-6):
    logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, upstream_T = batch
    rest = (old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)

    def expected_fn(lp):
        return losses_policy_loss(lp, *rest, options=options, gamma=gamma)[0]

    def actual_fn(lp):
        return policy_loss(lp, *rest, options=options, gamma=gamma, impl=impl)

    expected = loss_and_grad(expected_fn, logprobs_T, upstream_T)
    actual = loss_and_grad(actual_fn, logprobs_T, upstream_T)
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(actual[1], expected[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("off_policy", OFF_POLICY_MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_losses_policy_loss(impl, off_policy, dual_clip, device):
    options = PolicyLossOptions(
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=dual_clip,
        off_policy=off_policy,
        off_policy_clip_low=0.1,
        off_policy_clip_high=0.5,
        truncated_is_cap=1.5,
    )
    assert_matches_losses(make_batch(3000, device), options, torch.tensor(0.7, device=device), impl)


def _boundary_batch(device):
    """Tokens on every edge: r = 1 exactly (the clip bound when a range is 0), |log-ratio| = 20 and beyond, A = 0,
    the dual-clip cap reached with equality, masked tokens; each row once on-policy and once guided."""
    log_ratio = [0.0, 0.0, 0.0, 20.0, -20.0, 25.0, -25.0, 0.0, math.log(3.0), -3.0, 0.5]
    advantage = [1.0, -1.0, 0.0, 1.0, -1.0, -2.0, 2.0, -1.0, -1.0, -0.5, 1.5]
    mask = [True] * 10 + [False]
    old_T = torch.full((len(log_ratio),), -2.0)
    logprobs_T = old_T + torch.tensor(log_ratio)
    twice = [torch.cat([t, t]) for t in (logprobs_T, old_T, torch.tensor(advantage), torch.tensor(mask))]
    is_guided_T = torch.arange(2 * len(log_ratio)) >= len(log_ratio)
    upstream_T = torch.linspace(-1.0, 2.0, 2 * len(log_ratio))
    return tuple(t.to(device) for t in (*twice, is_guided_T, upstream_T))


@pytest.mark.parametrize("dual_clip", [None, 1.0])
@pytest.mark.parametrize("off_policy", OFF_POLICY_MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_losses_at_clip_boundaries(impl, off_policy, dual_clip, device):
    """clip_high=0 and off_policy_clip_low=0 put a clip bound exactly at r = 1, where max() ties and clamp passes."""
    options = PolicyLossOptions(
        clip_low=0.2,
        clip_high=0.0,
        dual_clip=dual_clip,
        off_policy=off_policy,
        off_policy_clip_low=0.0,
        off_policy_clip_high=0.3,
        truncated_is_cap=1.0,
    )
    assert_matches_losses(_boundary_batch(device), options, 1.0, impl)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_with_grad_is_the_autograd_derivative(impl, device):
    logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, _ = make_batch(500, device, seed=1)
    options = PolicyLossOptions(dual_clip=3.0, off_policy="shaping")
    rest = (old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)
    loss_T, grad_T = policy_loss_with_grad(logprobs_T, *rest, options=options, gamma=0.9, impl=impl)
    expected = loss_and_grad(
        lambda lp: policy_loss_reference(lp, *rest, options=options, gamma=0.9), logprobs_T, torch.ones_like(loss_T)
    )
    torch.testing.assert_close(loss_T, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_T, expected[1], rtol=1e-5, atol=1e-6)
    assert loss_T.dtype == torch.float32 and grad_T.dtype == torch.float32


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp32_kernels_within_tolerance_of_fp64_truth(impl, device, tolerance):
    logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, upstream_T = make_batch(500, device, seed=2)
    options = PolicyLossOptions(off_policy="clip", dual_clip=3.0)
    rest = (old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)
    truth = loss_and_grad(
        lambda lp: policy_loss_reference(lp, *(t.double() for t in rest), options=options),
        logprobs_T.double(),
        upstream_T.double(),
    )
    actual = loss_and_grad(lambda lp: policy_loss(lp, *rest, options=options, impl=impl), logprobs_T, upstream_T)
    atol, rtol = tolerance[torch.float32]
    for got, want in zip(actual, truth, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_gamma_tensor_and_float_agree_and_masks_accept_integers(device):
    batch = make_batch(200, device, seed=3)
    logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, _ = batch
    options = PolicyLossOptions(off_policy="shaping")
    with_float = policy_loss(
        logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, options=options, gamma=0.5, impl="triton"
    )
    with_tensor = policy_loss(
        logprobs_T,
        old_logprobs_T,
        advantages_T,
        loss_mask_T.int(),
        is_guided_T.float(),
        options=options,
        gamma=torch.tensor(0.5, device=device),
        impl="triton",
    )
    torch.testing.assert_close(with_float, with_tensor, rtol=0, atol=0)


def test_validation(device):
    logprobs_T, old_logprobs_T, advantages_T, loss_mask_T, is_guided_T, _ = make_batch(10, device)
    rest = (old_logprobs_T, advantages_T, loss_mask_T, is_guided_T)
    with pytest.raises(ValueError, match="off_policy"):
        policy_loss(logprobs_T, *rest, options=PolicyLossOptions(off_policy="bogus"), impl="torch")
    with pytest.raises(ValueError, match="impl"):
        policy_loss(logprobs_T, *rest, options=PolicyLossOptions(), impl="cuda")
    with pytest.raises(ValueError, match="shapes"):
        policy_loss(logprobs_T[:5], *rest, options=PolicyLossOptions())
    with pytest.raises(ValueError, match="autograd-only"):
        policy_loss_with_grad(logprobs_T, *rest, options=PolicyLossOptions(), impl="reference")
