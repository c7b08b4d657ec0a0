"""torch.ops.guide_mega.group_advantages (the C++ extension) against the float64 eager reference.

Shape legend: N samples, G groups.
"""

import shutil

import pytest
import torch

pytest.importorskip("guide_mega._C", reason="the C++ extension guide_mega._C is not built")

from guide_mega.algorithms.advantages import (  # noqa: E402  (after the skip: the op must exist)
    ADVANTAGE_MODES,
    group_advantages,
    group_advantages_reference,
    group_ids_from_sizes,
)

_OP = torch.ops.guide_mega.group_advantages.default
_MAX_GROUP_SIZE = 64
_HAS_CXX_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++"))
# Both paths accumulate in float64 and differ only in rounding order; this is far tighter than K7's 1e-6.
_FLOAT64_TOL = {"rtol": 1e-10, "atol": 1e-10}
_OPTION_GRID = [
    dict(mode=mode, unbiased_std=unbiased_std, eps_inside_sqrt=eps_inside_sqrt)
    for mode in ADVANTAGE_MODES
    for unbiased_std in (True, False)
    for eps_inside_sqrt in (True, False)
]


def _option_id(options: dict) -> str:
    return "-".join(f"{key}={value}" for key, value in options.items())


def _random_groups(num_groups: int, *, ids_dtype: torch.dtype) -> torch.Tensor:
    """Shuffled group ids [N] for num_groups groups of random sizes in 1..64 (so N is up to ~64 * G)."""
    sizes_G = torch.randint(1, _MAX_GROUP_SIZE + 1, (num_groups,))
    group_ids_N = group_ids_from_sizes(sizes_G)
    return group_ids_N[torch.randperm(group_ids_N.numel())].to(ids_dtype)


def _mixed_rewards(num_samples: int) -> torch.Tensor:
    """Float64 rewards [N]: binary for half the samples, Gaussian for the rest, so groups mix both."""
    binary_N = torch.randint(0, 2, (num_samples,), dtype=torch.float64)
    gaussian_N = torch.randn(num_samples, dtype=torch.float64)
    return torch.where(torch.rand(num_samples) < 0.5, binary_N, gaussian_N)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("options", _OPTION_GRID, ids=_option_id)
def test_matches_reference_on_random_variable_size_groups(options: dict, ids_dtype: torch.dtype):
    group_ids_N = _random_groups(3000, ids_dtype=ids_dtype)
    rewards_N = _mixed_rewards(group_ids_N.numel())
    expected_N = group_advantages_reference(rewards_N, group_ids_N, **options)
    actual_N = group_advantages(rewards_N, group_ids_N, impl="cpp", **options)
    torch.testing.assert_close(actual_N, expected_N, **_FLOAT64_TOL)


@pytest.mark.parametrize("rewards_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_low_precision_rewards_keep_their_dtype(rewards_dtype: torch.dtype, mode: str):
    group_ids_N = _random_groups(200, ids_dtype=torch.int64)
    rewards_N = _mixed_rewards(group_ids_N.numel()).to(rewards_dtype)
    actual_N = group_advantages(rewards_N, group_ids_N, mode=mode, impl="cpp")
    assert actual_N.dtype == rewards_dtype
    torch.testing.assert_close(actual_N, group_advantages_reference(rewards_N, group_ids_N, mode=mode))


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("options", _OPTION_GRID, ids=_option_id)
def test_singleton_and_constant_groups_get_exactly_zero(options: dict, eps: float):
    # Group 0 is a singleton; groups 1-3 are constant, including 0.1 (whose mean 0.3 / 3 is inexact) and a large
    # offset; group 4 varies and must not be zero.
    rewards_N = torch.tensor([5.0, 0.1, 0.1, 0.1, 1e6 + 0.3, 1e6 + 0.3, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    group_ids_N = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    actual_N = group_advantages(rewards_N, group_ids_N, eps=eps, impl="cpp", **options)
    assert torch.equal(actual_N[:9], torch.zeros(9, dtype=torch.float64))
    assert (actual_N[9:] != 0).all()
    if eps > 0:
        torch.testing.assert_close(actual_N, group_advantages_reference(rewards_N, group_ids_N, eps=eps, **options))


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
def test_large_offset_rewards_stay_accurate(mode: str):
    # Advantages do not change when every reward moves by the same amount, and r - 1e6 is exact in float64, so the
    # reference on the de-offset rewards is the ground truth. Centring on the float64 group mean (the reference
    # on the raw rewards) is off by ~1e-7 here, and a naive sum(r^2) - sum(r)^2 / n would lose every digit.
    group_ids_N = _random_groups(500, ids_dtype=torch.int64)
    offset = 1e6
    rewards_N = offset + 1e-3 * torch.randn(group_ids_N.numel(), dtype=torch.float64)
    expected_N = group_advantages_reference(rewards_N - offset, group_ids_N, mode=mode, eps=0.0)
    actual_N = group_advantages(rewards_N, group_ids_N, mode=mode, eps=0.0, impl="cpp")
    torch.testing.assert_close(actual_N, expected_N, rtol=1e-12, atol=1e-12)


def test_large_batch_of_small_groups():
    group_ids_N = group_ids_from_sizes(torch.full((12_500,), 8))[torch.randperm(100_000)]
    rewards_N = _mixed_rewards(100_000)
    expected_N = group_advantages_reference(rewards_N, group_ids_N)
    torch.testing.assert_close(group_advantages(rewards_N, group_ids_N, impl="cpp"), expected_N, **_FLOAT64_TOL)


def test_strided_inputs_and_empty_groups():
    rewards_2N = _mixed_rewards(400)
    group_ids_2N = torch.randint(0, 30, (400,))
    rewards_N, group_ids_N = rewards_2N[::2], group_ids_2N[1::2]
    assert not rewards_N.is_contiguous()
    # num_groups above max id + 1 leaves empty groups, which change nothing.
    actual_N = group_advantages(rewards_N, group_ids_N, num_groups=50, impl="cpp")
    torch.testing.assert_close(actual_N, group_advantages_reference(rewards_N, group_ids_N), **_FLOAT64_TOL)


def test_empty_input():
    empty_N = torch.empty(0, dtype=torch.float32)
    actual_N = _OP(empty_N, torch.empty(0, dtype=torch.int64), -1, 0, True, 1e-6, False)
    assert actual_N.shape == (0,) and actual_N.dtype == torch.float32


_F64 = torch.float64
_ERROR_CASES = [
    ("nan", torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]), {}, ValueError, "rewards must be finite"),
    ("inf", torch.tensor([0.0, float("-inf")]), torch.tensor([0, 1]), {}, ValueError, "rewards must be finite"),
    ("negative id", torch.tensor([0.0, 1.0]), torch.tensor([0, -1]), {}, ValueError, "group_ids must be >= 0"),
    ("id >= G", torch.tensor([0.0, 1.0]), torch.tensor([0, 3]), {"num_groups": 3}, ValueError, "num_groups=3"),
    ("length", torch.zeros(3), torch.tensor([0, 0]), {}, ValueError, "rewards has 3 entries but group_ids has 2"),
    ("2-D", torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64), {}, ValueError, "must be 1-D"),
    ("float ids", torch.zeros(2), torch.zeros(2), {}, TypeError, "group_ids must be int32 or int64"),
    ("int rewards", torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), {}, TypeError, "rewards"),
    ("mode", torch.zeros(2), torch.zeros(2, dtype=torch.int64), {"mode": 3}, ValueError, "mode must be"),
    ("eps", torch.zeros(2), torch.zeros(2, dtype=torch.int64), {"eps": -1.0}, ValueError, "eps must be finite"),
    ("num_groups", torch.zeros(2), torch.zeros(2, dtype=torch.int64), {"num_groups": -2}, ValueError, "num_groups"),
]


def _call_op(rewards_N, group_ids_N, *, num_groups=-1, mode=0, unbiased_std=True, eps=1e-6, eps_inside_sqrt=False):
    return _OP(rewards_N, group_ids_N, num_groups, mode, unbiased_std, eps, eps_inside_sqrt)


@pytest.mark.parametrize(
    ("rewards_N", "group_ids_N", "options", "error", "match"),
    [case[1:] for case in _ERROR_CASES],
    ids=[case[0] for case in _ERROR_CASES],
)
def test_invalid_inputs_raise_clear_errors(rewards_N, group_ids_N, options, error, match):
    with pytest.raises(error, match=match):
        _call_op(rewards_N, group_ids_N, **options)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(50, dtype=_F64), torch.randint(0, 7, (50,)), -1, 0, True, 1e-6, False),
        (torch.randn(50), torch.randint(0, 7, (50,), dtype=torch.int32), 10, 1, False, 1e-6, True),
        (torch.randn(50, dtype=torch.bfloat16), torch.randint(0, 3, (50,)), -1, 2, True, 0.0, False),
    ],
    ids=["f64-int64-grpo", "f32-int32-dr_grpo", "bf16-int64-rloo"],
)
def test_opcheck(args):
    torch.library.opcheck(_OP, args)


def _scaled_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """A small graph around the op: advantages [N] of rewards scaled by 2, shifted by 1."""
    return torch.ops.guide_mega.group_advantages(2 * rewards_N, group_ids_N, -1, 0, True, 1e-6, False) + 1


# Inductor imports torch's own deprecated torch.jit modules; the warning is not about this op.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend: str):
    if backend == "inductor" and not _HAS_CXX_COMPILER:
        pytest.skip("inductor needs a C++ compiler to compile for CPU")
    torch._dynamo.reset()
    compiled = torch.compile(_scaled_advantages, fullgraph=True, backend=backend, dynamic=True)
    for num_samples in (40, 70):
        rewards_N = torch.randn(num_samples)
        group_ids_N = torch.randint(0, 9, (num_samples,))
        torch.testing.assert_close(compiled(rewards_N, group_ids_N), _scaled_advantages(rewards_N, group_ids_N))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rewards_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("options", _OPTION_GRID, ids=_option_id)
def test_cuda_matches_reference(options: dict, ids_dtype: torch.dtype, rewards_dtype: torch.dtype):
    group_ids_N = _random_groups(3000, ids_dtype=ids_dtype)
    rewards_N = _mixed_rewards(group_ids_N.numel()).to(rewards_dtype)
    expected_N = group_advantages_reference(rewards_N, group_ids_N, **options)
    actual_N = group_advantages(rewards_N.cuda(), group_ids_N.cuda(), impl="cpp", **options)
    assert actual_N.is_cuda and actual_N.dtype == rewards_dtype
    tolerance = _FLOAT64_TOL if rewards_dtype == _F64 else {}
    torch.testing.assert_close(actual_N.cpu(), expected_N, **tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_constant_groups_and_errors():
    rewards_N = torch.tensor([5.0, 0.1, 0.1, 0.1, 0.0, 1.0], dtype=_F64, device="cuda")
    group_ids_N = torch.tensor([0, 1, 1, 1, 2, 2], device="cuda")
    actual_N = _call_op(rewards_N, group_ids_N, eps=0.0)
    assert torch.equal(actual_N[:4].cpu(), torch.zeros(4, dtype=_F64))
    for _, bad_rewards_N, bad_ids_N, options, error, match in _ERROR_CASES[:4]:
        with pytest.raises(error, match=match):
            _call_op(bad_rewards_N.cuda(), bad_ids_N.cuda(), **options)
    torch.library.opcheck(_OP, (rewards_N, group_ids_N, -1, 0, True, 1e-6, False))
