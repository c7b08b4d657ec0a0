"""GPU-only checks at realistic sizes: numerics targets (K5), the memory bound (K3), the loss at 16k tokens."""

import pytest
import torch

from guide_mega.algorithms.losses import PolicyLossOptions
from guide_mega.kernels import IGNORE_INDEX, policy_loss_with_grad, token_logprobs
from guide_mega.kernels.token_logprobs.reference import token_logprobs_reference

pytestmark = pytest.mark.gpu


def _lm_head_inputs(num_tokens, hidden, vocab, *, seed=0, dtype=torch.bfloat16):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden_TH = torch.randn(num_tokens, hidden, device="cuda", generator=generator).to(dtype)
    weight_VH = (torch.randn(vocab, hidden, device="cuda", generator=generator) * (4.0 / hidden**0.5)).to(dtype)
    target_ids_T = torch.randint(0, vocab, (num_tokens,), device="cuda", generator=generator)
    target_ids_T[::17] = IGNORE_INDEX
    return hidden_TH, weight_VH, target_ids_T


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize(("num_tokens", "hidden", "vocab"), [(4096, 1024, 50257), (256, 512, 262147)])
def test_bf16_numerics_against_fp32_logits(num_tokens, hidden, vocab):
    """K5: |dlogp|, |dentropy| <= 1e-3 against fp32 logits of the same bf16 inputs; dX, dW within 1e-2 relative.
    4096 tokens span two backward chunks (fp32 grad_weight accumulation); V > 250k checks the accumulators."""
    hidden_TH, weight_VH, target_ids_T = _lm_head_inputs(num_tokens, hidden, vocab)
    upstream_2T = torch.randn(2, num_tokens, device="cuda")
    results = []
    for compute in (token_logprobs_reference, token_logprobs):
        hidden_in = hidden_TH.clone().requires_grad_()
        weight_in = weight_VH.clone().requires_grad_()
        logprobs_T, entropy_T = compute(hidden_in, weight_in, target_ids_T, temperature=0.8, with_entropy=True)
        ((logprobs_T * upstream_2T[0]).sum() + (entropy_T * upstream_2T[1]).sum()).backward()
        results.append((logprobs_T.detach(), entropy_T.detach(), hidden_in.grad, weight_in.grad))
    (ref_lp, ref_h, ref_dx, ref_dw), (lp, ent, dx, dw) = results
    assert (lp <= 0).all() and torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp - ref_lp).abs().max().item() <= 1e-3
    assert (ent - ref_h).abs().max().item() <= 1e-3
    assert _relative_error(dx, ref_dx) <= 1e-2
    assert _relative_error(dw, ref_dw) <= 1e-2


def test_peak_memory_is_one_chunk_plus_gradients():
    """K3: forward + backward allocate at most one [chunk, V] dlogits workspace, the gradients and O(T) extra."""
    num_tokens, hidden, vocab = 8192, 1024, 65536
    hidden_TH, weight_VH, target_ids_T = _lm_head_inputs(num_tokens, hidden, vocab)
    hidden_TH.requires_grad_()
    weight_VH.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    logprobs_T, entropy_T = token_logprobs(hidden_TH, weight_VH, target_ids_T, with_entropy=True)
    (logprobs_T.sum() + entropy_T.sum()).backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - baseline
    workspace = 2048 * vocab * 2
    gradients = num_tokens * hidden * 2 + vocab * hidden * (4 + 2)
    small = 64 * num_tokens * 4 + (64 << 20)
    assert peak_extra <= workspace + gradients + small, f"peak extra {peak_extra / 2**20:.0f} MiB"
    naive_logits = num_tokens * vocab * (2 + 4)
    assert peak_extra * 4 <= naive_logits + gradients


def test_policy_loss_16k_tokens_matches_torch_path():
    generator = torch.Generator(device="cuda").manual_seed(0)
    num_tokens = 16384
    old_T = -torch.rand(num_tokens, device="cuda", generator=generator) * 5
    logprobs_T = old_T + torch.rand(num_tokens, device="cuda", generator=generator) - 0.5
    advantages_T = torch.randn(num_tokens, device="cuda", generator=generator)
    mask_T = torch.rand(num_tokens, device="cuda", generator=generator) > 0.1
    guided_T = torch.rand(num_tokens, device="cuda", generator=generator) > 0.5
    options = PolicyLossOptions(dual_clip=3.0, off_policy="shaping")
    gamma = torch.tensor(0.8, device="cuda")
    args = (logprobs_T, old_T, advantages_T, mask_T, guided_T)
    triton_out = policy_loss_with_grad(*args, options=options, gamma=gamma, impl="triton")
    torch_out = policy_loss_with_grad(*args, options=options, gamma=gamma, impl="torch")
    for got, want in zip(triton_out, torch_out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
