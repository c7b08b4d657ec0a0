"""The rollout-engine seam: sampling parameters, completions, the `RolloutEngine` protocol, weight buckets.

Logprob convention (every engine returns exactly this):

    logprobs[t] = log_softmax(logits_t / T)[response_ids[t]]

the log-probability of the sampled token under the temperature-scaled distribution, *before* top-k / top-p
truncation (T = 1 for greedy decoding). It is what the trainer computes for the same tokens with its temperature,
so rollout and trainer logprobs compare directly, and it is SGLang's default (its `return_logprob` output without
SGLANG_RETURN_ORIGINAL_LOGPROB). With top-k or top-p active, the probability a token was actually sampled with is
higher by the kept mass of the truncated distribution; that renormalization is deliberately not included.

Weights reach an engine as an iterator of (hf_name, tensor) pairs, in HF checkpoint naming; the engine never
sees the training backend.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from guide_mega.config import RolloutConfig
from guide_mega.types import FinishReason


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0 disables top-k."""
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    """Stop strings besides end-of-sequence; the response keeps the tokens that complete one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response like end-of-sequence does (kept in the response)."""
    seed: int | None = None
    """Seed for the engine's sampler (per request, see `request_seed`); None leaves it unseeded."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens (benchmarks): end-of-sequence and stop tokens do not stop a response."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < -1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, config: RolloutConfig, *, seed: int | None = None) -> SamplingParams:
        return cls(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            stop=tuple(config.stop),
            seed=seed,
        )


@dataclass(kw_only=True)
class Completion:
    """One sampled response."""

    response_ids: list[int]
    """Sampled tokens, including the end-of-sequence token or the tokens completing a stop string."""
    logprobs: list[float]
    """Per response token, under the convention in this module's docstring."""
    finish_reason: FinishReason
    """stop (end-of-sequence or a stop string), length (max_new_tokens reached) or abort."""
    text: str = ""
    """The decoded response, special tokens removed."""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(f"completion has {len(self.logprobs)} logprobs for {len(self.response_ids)} tokens")


def request_seed(seed: int, *key: object) -> int:
    """A request's own sampling seed, from the step's `seed` and a key naming the request (prompt id, wave, sample
    index): a stable 63-bit hash, so a request samples the same tokens whichever engine, batch or position it
    lands in."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# What an engine's wake() can bring back, in the order a colocated step needs them: the weights (for the sync to
# write into), then the KV cache (and CUDA graphs).
WAKE_PARTS: tuple[str, ...] = ("weights", "kv_cache")


class RolloutEngine(Protocol):
    """What the trainer needs from an inference engine."""

    def generate(
        self, requests: Sequence[Sequence[int]], sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """One completion per request (a prompt's token ids), in request order. With `seeds`, request i is sampled
        from its own random stream seeded by seeds[i], independent of the other requests of the call."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights, given in HF naming; afterwards generate samples from them."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) while the policy trains."""
        ...

    def wake(self, *, parts: Sequence[str] = WAKE_PARTS) -> None:
        """Take the memory of `parts` back ('weights', then after a weight sync 'kv_cache'); generate works again
        once both are back."""
        ...

    def close(self) -> None: ...


class WeightSyncError(RuntimeError):
    """An engine holds other weights than the trainer pushed: the weight sync did not reach it."""


# What rollout.check_weight_sync compares after a push (HF names): the embedding, the first layer's q_proj, the
# final norm and the LM head; of each, the first rows of a matrix or the first values of a vector.
CHECKED_WEIGHTS = re.compile(
    r"(^|\.)(embed_tokens|lm_head|layers\.0\.self_attn\.q_proj)\.weight$|^model\.norm\.weight$"
)
_CHECK_ROWS, _CHECK_VALUES = 4, 4096


def weight_head(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a weight that a sync check compares, as float32 on CPU (a copy)."""
    head = tensor.detach()[: _CHECK_ROWS if tensor.dim() > 1 else _CHECK_VALUES]
    return head.to("cpu", torch.float32, copy=True)


def compare_weight_heads(where: str, name: str, held: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Raise WeightSyncError unless `held` equals `expected` within `tolerance` relative (the dtypes' rounding)."""
    if held.shape != expected.shape:
        raise WeightSyncError(f"{where}: {name} has shape {tuple(held.shape)}, the trainer's {tuple(expected.shape)}")
    excess = (held - expected).abs() - tolerance * expected.abs() - torch.finfo(torch.float32).tiny
    if (excess > 0).any():
        worst = int(excess.flatten().argmax())
        raise WeightSyncError(
            f"{where} holds other values of {name} than the trainer pushed: at flat index {worst} "
            f"{held.flatten()[worst].item():.6g} vs {expected.flatten()[worst].item():.6g} (tolerance "
            f"{tolerance:.3g} relative); the weight sync did not reach it"
        )


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups of consecutive (name, tensor) pairs of at most `bucket_bytes` each (a larger tensor goes alone).

    Sending weights in buckets bounds the extra memory of an update to one bucket while keeping the number of
    engine calls small.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
