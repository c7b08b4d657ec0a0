"""Per-token logprobs and entropies fused with the LM head, vocabulary-parallel, forward and backward."""

from .dispatch import (
    IMPLS,
    logprob_partials,
    logprob_partials_from_logits,
    resolve_impl,
    token_logprobs,
    token_logprobs_from_logits,
)
from .partials import IGNORE_INDEX, LogprobPartials, ShardReduce, TokenLogprobs, combine_partials
from .reference import token_logprobs_reference

__all__ = [
    "IGNORE_INDEX",
    "IMPLS",
    "LogprobPartials",
    "ShardReduce",
    "TokenLogprobs",
    "combine_partials",
    "logprob_partials",
    "logprob_partials_from_logits",
    "resolve_impl",
    "token_logprobs",
    "token_logprobs_from_logits",
    "token_logprobs_reference",
]
