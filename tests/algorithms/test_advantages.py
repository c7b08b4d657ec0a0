"""Group advantages and GAE against hand-computed values and independent per-group loops."""

import math
import statistics

import pytest
import torch

from guide_mega.algorithms.advantages import (
    gae_advantages,
    gae_advantages_packed,
    group_advantages,
    group_advantages_reference,
    group_ids_from_sizes,
    terminal_rewards_packed,
)


def _loop_advantages(rewards, group_ids, *, mode, unbiased_std=True, eps=1e-6, eps_inside_sqrt=False):
    """Per-group Python loop with the statistics module: an implementation independent of the tensor code."""
    by_group = {}
    for index, group in enumerate(group_ids):
        by_group.setdefault(group, []).append(index)
    out = [0.0] * len(rewards)
    for members in by_group.values():
        values = [rewards[i] for i in members]
        if len(values) == 1 or max(values) == min(values):
            continue
        mean = statistics.fmean(values)
        for i in members:
            if mode == "dr_grpo":
                out[i] = rewards[i] - mean
            elif mode == "rloo":
                out[i] = rewards[i] - statistics.fmean([rewards[j] for j in members if j != i])
            else:
                var = statistics.variance(values) if unbiased_std else statistics.pvariance(values)
                scale = math.sqrt(var + eps) if eps_inside_sqrt else math.sqrt(var) + eps
                out[i] = (rewards[i] - mean) / scale
    return out


def test_grpo_hand_computed():
    # group 0: mixed; group 1: zero variance; group 2: a single sample.
    rewards_N = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    ids_N = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    unbiased = group_advantages_reference(rewards_N, ids_N, eps=0.0)
    expected = 0.5 / math.sqrt(1.0 / 3.0)  # mean 0.5, unbiased variance 4 * 0.25 / 3
    torch.testing.assert_close(
        unbiased[:4], torch.tensor([expected, -expected, -expected, expected], dtype=torch.float64)
    )
    assert unbiased[4:].eq(0).all()
    population = group_advantages_reference(rewards_N, ids_N, eps=0.0, unbiased_std=False)
    torch.testing.assert_close(population[:4], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    inside = group_advantages_reference(rewards_N, ids_N, eps=0.25, unbiased_std=False, eps_inside_sqrt=True)
    torch.testing.assert_close(inside[:4], torch.tensor([1, -1, -1, 1], dtype=torch.float64) * 0.5 / math.sqrt(0.5))
    outside = group_advantages_reference(rewards_N, ids_N, eps=0.25, unbiased_std=False)
    torch.testing.assert_close(outside[:4], torch.tensor([1, -1, -1, 1], dtype=torch.float64) * 0.5 / 0.75)


def test_rloo_and_dr_grpo_hand_computed():
    rewards_N = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0])
    ids_N = torch.tensor([0, 0, 0, 0, 1])
    rloo = group_advantages_reference(rewards_N, ids_N, mode="rloo")
    torch.testing.assert_close(rloo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]))
    dr = group_advantages_reference(rewards_N, ids_N, mode="dr_grpo")
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0]))


def test_zero_variance_with_inexact_mean_is_exactly_zero():
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point; with eps=0 a rounded variance would give +-1.
    rewards_N = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    for mode in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages_reference(rewards_N, torch.zeros(3, dtype=torch.int64), mode=mode, eps=0.0).eq(0).all()


def test_all_groups_singletons():
    rewards_N = torch.randn(7)
    assert group_advantages_reference(rewards_N, torch.arange(7)).eq(0).all()


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("unbiased_std,eps_inside_sqrt", [(True, False), (False, False), (True, True)])
def test_random_groups_match_loop(mode, unbiased_std, eps_inside_sqrt):
    sizes = torch.randint(1, 17, (40,))
    ids_N = group_ids_from_sizes(sizes)
    ids_N = ids_N[torch.randperm(ids_N.numel())]  # groups need not be contiguous
    rewards_N = torch.randn(ids_N.numel(), dtype=torch.float64) * 3 + 100
    options = dict(mode=mode, unbiased_std=unbiased_std, eps=1e-6, eps_inside_sqrt=eps_inside_sqrt)
    got = group_advantages_reference(rewards_N, ids_N, **options)
    expected = torch.tensor(_loop_advantages(rewards_N.tolist(), ids_N.tolist(), **options), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(group_advantages(rewards_N, ids_N, **options), got)


def test_output_dtype_follows_rewards_and_accumulates_in_float64():
    rewards_N = torch.tensor([1e6 + 1, 1e6 - 1, 1e6 + 1, 1e6 - 1], dtype=torch.float32)
    got = group_advantages_reference(rewards_N, torch.zeros(4, dtype=torch.int32), eps=0.0, unbiased_std=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, 1.0, -1.0]))


@pytest.mark.parametrize(
    "rewards,ids,kwargs,message",
    [
        ([1.0, float("nan")], [0, 0], {}, "finite"),
        ([1.0, float("inf")], [0, 0], {}, "finite"),
        ([1.0, 0.0], [0, -1], {}, ">= 0"),
        ([1.0, 0.0], [0], {}, "entries"),
        ([1.0, 0.0], [0, 3], {"num_groups": 2}, "num_groups"),
        ([1.0, 0.0], [0, 0], {"mode": "ppo"}, "mode"),
    ],
)
def test_bad_inputs_raise(rewards, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages_reference(torch.tensor(rewards), torch.tensor(ids), **kwargs)


def _gae_loop(rewards, values, gamma, lam):
    """Textbook GAE for one sequence, value 0 after the end."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_hand_computed():
    rewards_BT = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values_BT = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    advantages_BT, returns_BT = gae_advantages(rewards_BT, values_BT, torch.ones_like(values_BT), gamma=0.9, lam=0.8)
    delta2 = 1.0 - 0.7
    delta1 = 0.9 * 0.7 - 0.6
    delta0 = 0.9 * 0.6 - 0.5
    a2 = delta2
    a1 = delta1 + 0.72 * a2
    a0 = delta0 + 0.72 * a1
    torch.testing.assert_close(advantages_BT, torch.tensor([[a0, a1, a2]], dtype=torch.float64))
    torch.testing.assert_close(returns_BT, advantages_BT + values_BT)


def test_gae_padded_and_packed_match_loop():
    lengths = [5, 1, 3]
    gamma, lam = 0.95, 0.7
    rewards = [torch.randn(n, dtype=torch.float64) for n in lengths]
    values = [torch.randn(n, dtype=torch.float64) for n in lengths]
    expected = torch.cat(
        [torch.tensor(_gae_loop(r.tolist(), v.tolist(), gamma, lam)) for r, v in zip(rewards, values, strict=True)]
    )
    cu_seqlens = torch.tensor([0, 5, 6, 9])
    packed_adv, packed_ret = gae_advantages_packed(
        torch.cat(rewards), torch.cat(values), cu_seqlens, gamma=gamma, lam=lam
    )
    torch.testing.assert_close(packed_adv, expected.to(torch.float64))
    torch.testing.assert_close(packed_ret, expected + torch.cat(values))
    padded = torch.zeros(3, 5, dtype=torch.float64)
    rewards_BT, values_BT, mask_BT = padded.clone(), padded.clone(), padded.clone()
    for row, (r, v) in enumerate(zip(rewards, values, strict=True)):
        rewards_BT[row, : r.numel()], values_BT[row, : v.numel()], mask_BT[row, : r.numel()] = r, v, 1
    padded_adv, _ = gae_advantages(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
    torch.testing.assert_close(padded_adv[mask_BT.bool()], expected.to(torch.float64))
    assert padded_adv[~mask_BT.bool()].eq(0).all()


def test_gae_packed_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="cu_seqlens"):
        gae_advantages_packed(torch.zeros(4), torch.zeros(4), torch.tensor([0, 3, 2, 4]))


def test_terminal_rewards_sit_on_each_last_token():
    rewards_S = torch.tensor([1.0, 0.5, -2.0, 3.0])
    cu_seqlens_S1 = torch.tensor([0, 3, 3, 4, 6])  # the second response is empty: its reward has no token
    rewards_T = terminal_rewards_packed(rewards_S, cu_seqlens_S1)
    torch.testing.assert_close(rewards_T, torch.tensor([0.0, 0.0, 1.0, -2.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="rewards for"):
        terminal_rewards_packed(rewards_S[:3], cu_seqlens_S1)
