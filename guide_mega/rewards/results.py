"""What every reward function takes and returns: the scoring options and the per-response result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from guide_mega.rewards.answers import is_well_formatted
from guide_mega.rewards.sandbox import SandboxLimits

RewardStatus = Literal["ok", "timeout", "error"]
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, kw_only=True)
class RewardOptions:
    lenient: bool = False
    """Fall back to the last number in the response when it marks no answer (for very small models)."""
    format_gate: bool = False
    """Reward 0 (and not correct) unless `is_well_formatted(response)`."""
    format_bonus: float = 0.0
    """Added to the reward of a well-formatted response."""
    verify_timeout_s: int = 2
    """math-verify's own per-operation timeout inside the worker (whole seconds: it uses signal.alarm)."""
    code_limits: SandboxLimits = field(default_factory=SandboxLimits)
    """code: the sandbox limits of each program run (one run per test)."""
    code_partial_credit: bool = False
    """code: reward the fraction of tests passed instead of 1 only when every test passes."""
    code_time_budget_s: float | None = None
    """code: wall seconds for all of a response's tests; a test that could end past it is not run and fails."""
    code_scratch_dir: str | None = None
    """code: where program runs get their directories (the reward pool's own); None: the system's temp dir."""


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    reward: float
    correct: bool
    is_formatted: bool
    extracted: str | None = None
    status: RewardStatus = "ok"
    """ok, or timeout / error: verification did not finish, the reward is 0 and the pool counts it."""
    error: str = ""
    """Why verification failed (status timeout / error), or why a program failed its tests (status ok)."""
    extras: dict[str, float] = field(default_factory=dict)
    """A user reward function's extra metrics (`rewards/custom.py`), averaged into the step's metrics."""


def failed_result(status: RewardStatus, error: str) -> RewardResult:
    """Reward 0 for a response whose verification timed out or raised; the error is cut to its first
    MAX_ERROR_CHARS characters (a verifier's message may quote the whole response, and it is logged)."""
    if len(error) > MAX_ERROR_CHARS:
        error = f"{error[:MAX_ERROR_CHARS]}... ({len(error)} characters)"
    return RewardResult(reward=0.0, correct=False, is_formatted=False, status=status, error=error)


def finish_result(response: str, extracted: str | None, correct: bool, options: RewardOptions) -> RewardResult:
    """The result of a verified final answer: the format gate, then 1 for correct plus the format bonus."""
    is_formatted = is_well_formatted(response)
    if options.format_gate and not is_formatted:
        return RewardResult(reward=0.0, correct=False, is_formatted=False, extracted=extracted)
    reward = float(correct) + (options.format_bonus if is_formatted else 0.0)
    return RewardResult(reward=reward, correct=correct, is_formatted=is_formatted, extracted=extracted)
