"""Records that cross module boundaries: prompts, rollouts, groups of rollouts and the packed train batch.

Shape legend: S sequences (responses) in a batch, T response tokens of the whole batch packed end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ChatMessage = dict[str, str]
PromptContent = str | list[ChatMessage]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(kw_only=True)
class Prompt:
    """One training or evaluation problem."""

    id: str
    """Stable identifier (used for logging, resume and the eval analysis)."""
    prompt: PromptContent
    """The hint-free problem: plain text, or chat messages [{role, content}, ...]."""
    answer: str | list[str]
    """Ground truth for the verifier (several strings mean any of them is accepted)."""
    hint: str | list[str] | None = None
    """Natural-language guidance inserted into the prompt by the hint template (never the answer); a list is graded
    hints, weakest first (`num_hint_levels`)."""
    hinted_prompt: PromptContent | None = None
    """A complete hinted prompt given by the data (the authors' schema); takes precedence over `hint`."""
    hint_template: str | None = None
    """This prompt's own hint template (fields {prompt} and {hint}), for a generator that puts the hint inside its
    prompt; None: algorithm.guide.hint_template."""
    source: str = ""
    """Dataset or generator name, for per-source metrics."""
    metadata: dict = field(default_factory=dict)
    """Anything the reward function needs beyond `answer` (e.g. a reasoning-gym entry)."""

    @property
    def has_hint(self) -> bool:
        return self.num_hint_levels > 0

    @property
    def num_hint_levels(self) -> int:
        """Graded hints available: 1 for a complete `hinted_prompt` (which wins) or a single hint; a list's length."""
        if self.hinted_prompt is not None:
            return 1
        if isinstance(self.hint, list):
            return len(self.hint)
        return int(self.hint is not None)


@dataclass(kw_only=True)
class Rollout:
    """One sampled response and everything needed to train on it."""

    prompt_id: str
    sampled_prompt_ids: list[int]
    """Token ids of the prompt the response was sampled under (the hinted prompt for guided rollouts)."""
    train_prompt_ids: list[int]
    """Token ids of the hint-free prompt the policy is trained under (equal to sampled_prompt_ids if unguided)."""
    response_ids: list[int]
    behaviour_logprobs: list[float] | None = None
    """Per-token logprobs of response_ids under the sampling distribution, from the rollout engine."""
    response_text: str = ""
    reward: float = 0.0
    correct: bool = False
    """Whether the verifier accepted the answer; success rates (and so 'unsolved') count these."""
    is_guided: bool = False
    hint_level: int = -1
    """The hint level a guided rollout was sampled at (an index into its prompt's graded hints, weakest first; a
    single hint is level 0); -1 for a hint-free one."""
    finish_reason: FinishReason = "stop"

    def __post_init__(self) -> None:
        if self.behaviour_logprobs is not None and len(self.behaviour_logprobs) != len(self.response_ids):
            raise ValueError(
                f"rollout {self.prompt_id}: {len(self.behaviour_logprobs)} behaviour logprobs for "
                f"{len(self.response_ids)} response tokens"
            )


@dataclass(kw_only=True)
class RolloutGroup:
    """The G rollouts of one prompt, all sampled under the same context."""

    prompt: Prompt
    rollouts: list[Rollout]
    is_guided: bool = False

    @property
    def rewards(self) -> list[float]:
        return [rollout.reward for rollout in self.rollouts]

    @property
    def success_rate(self) -> float:
        if not self.rollouts:
            return 0.0
        return sum(rollout.correct for rollout in self.rollouts) / len(self.rollouts)


@dataclass(frozen=True, kw_only=True)
class TrainBatch:
    """A step's training data: S responses packed end to end, with per-token and per-sequence tensors.

    Immutable and validated once: what the trainer derives from it (old logprobs, advantages, values) travels
    beside it as arguments. Guided samples carry two prompts: `sampled_prompt_ids` (the hinted context, for old
    logprobs) and `train_prompt_ids` (the hint-free context, for the current policy).
    """

    train_prompt_ids: list[list[int]]
    sampled_prompt_ids: list[list[int]]
    response_ids_T: torch.Tensor
    cu_seqlens_S1: torch.Tensor
    """Response boundaries: sequence s spans response_ids_T[cu_seqlens_S1[s]:cu_seqlens_S1[s + 1]]."""
    is_guided_S: torch.Tensor
    rewards_S: torch.Tensor
    group_ids_S: torch.Tensor
    hint_level_S: torch.Tensor
    """The hint level each sequence was sampled at (int64; -1 exactly where the sequence is not guided)."""
    behaviour_logprobs_T: torch.Tensor | None = None
    """Per-token logprobs reported by the rollout engine under the sampled context (None if it gave none)."""
    mini_batch_S: torch.Tensor | None = None
    """In a data-parallel rank's share of a step: the optimizer step (mini-batch) each sequence belongs to. None in
    a whole batch, whose mini-batches are cut from its groups."""

    def __post_init__(self) -> None:
        num_seqs = len(self.train_prompt_ids)
        checks = {
            "sampled_prompt_ids": len(self.sampled_prompt_ids),
            "cu_seqlens_S1 - 1": self.cu_seqlens_S1.numel() - 1,
            "is_guided_S": self.is_guided_S.numel(),
            "rewards_S": self.rewards_S.numel(),
            "group_ids_S": self.group_ids_S.numel(),
            "hint_level_S": self.hint_level_S.numel(),
        }
        if self.mini_batch_S is not None:
            checks["mini_batch_S"] = self.mini_batch_S.numel()
        for name, count in checks.items():
            if count != num_seqs:
                raise ValueError(f"TrainBatch.{name} has {count} entries for {num_seqs} sequences")
        if not torch.equal(self.hint_level_S >= 0, self.is_guided_S.bool()):
            raise ValueError("TrainBatch.hint_level_S must be non-negative exactly where is_guided_S is true")
        self.check_per_token("response_ids_T", self.response_ids_T)
        if self.behaviour_logprobs_T is not None:
            self.check_per_token("behaviour_logprobs_T", self.behaviour_logprobs_T)

    @property
    def num_seqs(self) -> int:
        return len(self.train_prompt_ids)

    @property
    def num_tokens(self) -> int:
        """T: response tokens of the whole batch."""
        return int(self.cu_seqlens_S1[-1]) if self.num_seqs else 0

    def check_per_token(self, name: str, values_T: torch.Tensor) -> None:
        """Raise unless `values_T` has one entry per response token of this batch."""
        if values_T.numel() != self.num_tokens:
            raise ValueError(f"{name} has {values_T.numel()} entries for {self.num_tokens} response tokens")

    @property
    def lengths_S(self) -> torch.Tensor:
        """Response length of every sequence [S]."""
        return self.cu_seqlens_S1[1:] - self.cu_seqlens_S1[:-1]

    @property
    def seq_ids_T(self) -> torch.Tensor:
        """Sequence index of every response token [T]."""
        return torch.repeat_interleave(torch.arange(self.num_seqs), self.lengths_S)

    @property
    def is_guided_T(self) -> torch.Tensor:
        return self.is_guided_S[self.seq_ids_T]

    def per_token(self, values_S: torch.Tensor) -> torch.Tensor:
        """A per-sequence value [S] repeated over the sequence's response tokens [T]."""
        if values_S.numel() != self.num_seqs:
            raise ValueError(f"{values_S.numel()} per-sequence values for {self.num_seqs} sequences")
        return torch.repeat_interleave(values_S, self.lengths_S)
