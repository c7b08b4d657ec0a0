"""Advantage estimators: group-relative (GRPO, Dr. GRPO, RLOO) and GAE for PPO.

Shape legend: N samples, G groups, B sequences, T tokens (padded length or packed total), S sequences in a pack.

`group_advantages_reference` is the float64 eager spec of the C++ op `torch.ops.guide_mega.group_advantages`;
`group_advantages` dispatches to the op when the extension is built and falls back to the reference otherwise.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

AdvantageMode = Literal["grpo", "dr_grpo", "rloo"]
ADVANTAGE_MODES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")
_MODE_CODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2}


def group_ids_from_sizes(sizes_G: torch.Tensor | list[int]) -> torch.Tensor:
    """Group index per sample for contiguous groups of the given sizes: [2, 3] -> [0, 0, 1, 1, 1]."""
    sizes_G = torch.as_tensor(sizes_G, dtype=torch.int64)
    if (sizes_G < 0).any():
        raise ValueError(f"group sizes must be >= 0, got {sizes_G.tolist()}")
    return torch.repeat_interleave(torch.arange(sizes_G.numel()), sizes_G)


def _validate_group_inputs(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, num_groups: int | None) -> int:
    if rewards_N.dim() != 1 or group_ids_N.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must be 1-D, got {tuple(rewards_N.shape)} and {tuple(group_ids_N.shape)}"
        )
    if rewards_N.numel() != group_ids_N.numel():
        raise ValueError(f"rewards has {rewards_N.numel()} entries but group_ids has {group_ids_N.numel()}")
    if group_ids_N.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids must be int32 or int64, got {group_ids_N.dtype}")
    if not torch.isfinite(rewards_N).all():
        bad = torch.nonzero(~torch.isfinite(rewards_N)).flatten()[:5].tolist()
        raise ValueError(f"rewards must be finite; non-finite at indices {bad}")
    if group_ids_N.numel() and group_ids_N.min() < 0:
        raise ValueError(f"group_ids must be >= 0, got min {int(group_ids_N.min())}")
    inferred = int(group_ids_N.max()) + 1 if group_ids_N.numel() else 0
    if num_groups is None:
        return inferred
    if inferred > num_groups:
        raise ValueError(f"group_ids has index {inferred - 1} but num_groups={num_groups}")
    return num_groups


def group_advantages_reference(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    num_groups: int | None = None,
    mode: AdvantageMode = "grpo",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    eps_inside_sqrt: bool = False,
) -> torch.Tensor:
    """Group-relative advantages, computed in float64 and returned in the rewards' dtype. Shape [N].

    With mu_g, var_g the mean and variance of group g (size n_g) and r_i a reward in g:
      grpo:    A_i = (r_i - mu_g) / (sigma_g + eps)      or (r_i - mu_g) / sqrt(var_g + eps) if eps_inside_sqrt
               sigma_g^2 = var_g = sum (r - mu_g)^2 / (n_g - 1) if unbiased_std else / n_g
      dr_grpo: A_i = r_i - mu_g                            (no std scaling: Dr. GRPO)
      rloo:    A_i = r_i - mean_{j in g, j != i} r_j = n_g / (n_g - 1) * (r_i - mu_g)
    A group of one sample has no baseline to compare against, and a group whose rewards are all equal carries no
    signal: both get exactly 0 in every mode (decided by max == min, not by a rounded variance, so eps may be 0).
    """
    if mode not in _MODE_CODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    num_groups = _validate_group_inputs(rewards_N, group_ids_N, num_groups)
    rewards64_N = rewards_N.to(torch.float64)
    ids_N = group_ids_N.to(torch.int64)
    sizes_G = torch.zeros(num_groups, dtype=torch.float64, device=rewards_N.device).index_add_(
        0, ids_N, torch.ones_like(rewards64_N)
    )
    # Shift each group by one of its own rewards (its lowest-index member) before summing: rewards such as
    # 1e6 + small noise then lose no precision in the mean, and a constant group centres to exactly 0.
    index_N = torch.arange(ids_N.numel(), device=ids_N.device)
    first_G = torch.zeros(num_groups, dtype=torch.int64, device=ids_N.device)
    first_G = first_G.scatter_reduce(0, ids_N, index_N, "amin", include_self=False)
    shifted_N = rewards64_N - rewards64_N[first_G[ids_N]]
    mean_shifted_G = torch.zeros_like(sizes_G).index_add_(0, ids_N, shifted_N) / sizes_G.clamp(min=1)
    # Two-pass variance: centre first, then square.
    centred_N = shifted_N - mean_shifted_G[ids_N]
    sq_G = torch.zeros_like(sizes_G).index_add_(0, ids_N, centred_N * centred_N)
    size_N = sizes_G[ids_N]
    max_G = torch.full_like(sizes_G, -torch.inf).scatter_reduce(0, ids_N, rewards64_N, "amax")
    min_G = torch.full_like(sizes_G, torch.inf).scatter_reduce(0, ids_N, rewards64_N, "amin")
    varies_N = (max_G > min_G)[ids_N]
    if mode == "dr_grpo":
        advantages_N = centred_N
    elif mode == "rloo":
        advantages_N = centred_N * size_N / (size_N - 1).clamp(min=1)
    else:
        denom_G = (sizes_G - 1).clamp(min=1) if unbiased_std else sizes_G.clamp(min=1)
        var_G = sq_G / denom_G
        scale_G = torch.sqrt(var_G + eps) if eps_inside_sqrt else torch.sqrt(var_G) + eps
        advantages_N = centred_N / scale_G[ids_N]
    return torch.where(varies_N, advantages_N, 0.0).to(rewards_N.dtype)


_OP_STATE: dict[str, object] = {"checked": False, "available": False, "error": None}


def _load_op() -> bool:
    """Import the compiled extension once; warn once and fall back to the reference when it is missing."""
    if not _OP_STATE["checked"]:
        _OP_STATE["checked"] = True
        try:
            import guide_mega._C  # noqa: F401  (registers torch.ops.guide_mega.*)

            _OP_STATE["available"] = hasattr(torch.ops.guide_mega, "group_advantages")
        except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: a clashing op library
            _OP_STATE["error"] = repr(exc)
        if not _OP_STATE["available"]:
            warnings.warn(
                f"guide_mega._C is not available ({_OP_STATE['error']}); group advantages use the eager reference",
                stacklevel=3,
            )
    return bool(_OP_STATE["available"])


def group_advantages_impl() -> str:
    """Which implementation `group_advantages` uses: 'cpp' (the compiled op) or 'reference'."""
    return "cpp" if _load_op() else "reference"


def group_advantages(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    num_groups: int | None = None,
    mode: AdvantageMode = "grpo",
    unbiased_std: bool = True,
    eps: float = 1e-6,
    eps_inside_sqrt: bool = False,
    impl: Literal["auto", "cpp", "reference"] = "auto",
) -> torch.Tensor:
    """Group-relative advantages [N] with the semantics of `group_advantages_reference`.

    impl='auto' uses the compiled op when it is built, else the reference; 'cpp' requires the op.
    """
    options = dict(mode=mode, unbiased_std=unbiased_std, eps=eps, eps_inside_sqrt=eps_inside_sqrt)
    if impl == "reference" or (impl == "auto" and not _load_op()):
        return group_advantages_reference(rewards_N, group_ids_N, num_groups=num_groups, **options)
    if impl == "cpp" and not _load_op():
        raise RuntimeError(f"impl='cpp' requested but guide_mega._C failed to load: {_OP_STATE['error']}")
    if mode not in _MODE_CODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    num_groups = -1 if num_groups is None else num_groups
    return torch.ops.guide_mega.group_advantages(
        rewards_N, group_ids_N, num_groups, _MODE_CODES[mode], unbiased_std, eps, eps_inside_sqrt
    )


def gae_advantages(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences. Returns (advantages_BT, returns_BT).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t ;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    where m is the response mask (1 on valid tokens): the value after a sequence's last valid token is 0.
    returns = A + V. Padded positions get 0 advantage and 0 return.
    """
    if not (rewards_BT.shape == values_BT.shape == mask_BT.shape):
        raise ValueError(f"shape mismatch: {rewards_BT.shape}, {values_BT.shape}, {mask_BT.shape}")
    mask_BT = mask_BT.to(values_BT.dtype)
    _, length = rewards_BT.shape
    next_value_B = torch.zeros_like(values_BT[:, 0])
    next_adv_B = torch.zeros_like(values_BT[:, 0])
    next_mask_B = torch.zeros_like(values_BT[:, 0])
    advantages_BT = torch.zeros_like(values_BT)
    for t in reversed(range(length)):
        delta_B = rewards_BT[:, t] + gamma * next_value_B * next_mask_B - values_BT[:, t]
        adv_B = (delta_B + gamma * lam * next_mask_B * next_adv_B) * mask_BT[:, t]
        advantages_BT[:, t] = adv_B
        next_value_B, next_adv_B, next_mask_B = values_BT[:, t], adv_B, mask_BT[:, t]
    returns_BT = (advantages_BT + values_BT) * mask_BT
    return advantages_BT, returns_BT


def gae_advantages_packed(
    rewards_T: torch.Tensor,
    values_T: torch.Tensor,
    cu_seqlens_S1: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over packed sequences (cu_seqlens boundaries, [S+1]). Returns (advantages_T, returns_T).

    Same recursion as `gae_advantages`, restarted at every sequence boundary.
    """
    if rewards_T.shape != values_T.shape or rewards_T.dim() != 1:
        raise ValueError(f"rewards and values must be equal 1-D shapes, got {rewards_T.shape}, {values_T.shape}")
    bounds = cu_seqlens_S1.tolist()
    if (
        bounds[0] != 0
        or bounds[-1] != rewards_T.numel()
        or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True))
    ):
        raise ValueError(f"cu_seqlens must rise from 0 to {rewards_T.numel()}, got {bounds}")
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    width = max(lengths, default=0)
    padded = [torch.zeros(len(lengths), width, dtype=values_T.dtype) for _ in range(3)]
    for row, (start, length) in enumerate(zip(bounds[:-1], lengths, strict=True)):
        padded[0][row, :length] = rewards_T[start : start + length]
        padded[1][row, :length] = values_T[start : start + length]
        padded[2][row, :length] = 1
    advantages_BT, returns_BT = gae_advantages(*padded, gamma=gamma, lam=lam)
    valid_BT = padded[2].bool()
    return advantages_BT[valid_BT], returns_BT[valid_BT]


def terminal_rewards_packed(rewards_S: torch.Tensor, cu_seqlens_S1: torch.Tensor) -> torch.Tensor:
    """Per-token rewards [T] of packed sequences: sequence s's outcome reward on its last token, 0 elsewhere.

    A verifiable reward scores the whole response, so it arrives with the final token (an empty response has no
    token to carry it).
    """
    if rewards_S.dim() != 1 or cu_seqlens_S1.numel() != rewards_S.numel() + 1:
        raise ValueError(f"{rewards_S.numel()} rewards for {cu_seqlens_S1.numel() - 1} sequences")
    rewards_T = torch.zeros(int(cu_seqlens_S1[-1]), dtype=rewards_S.dtype)
    non_empty_S = cu_seqlens_S1[1:] > cu_seqlens_S1[:-1]
    rewards_T[cu_seqlens_S1[1:][non_empty_S] - 1] = rewards_S[non_empty_S]
    return rewards_T
