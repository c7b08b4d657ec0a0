"""Public entry points for per-token logprobs: validate, pick an implementation, combine the shard partials.

Shape legend: T tokens, H hidden size, V_local vocabulary entries held by this rank (all of them without TP).

impl="auto" runs the Triton kernels on CUDA tensors (fp32, bf16, fp16) and the chunked torch code elsewhere
(CPU, fp64); "triton", "chunked" and "reference" force one (Triton on CPU tensors needs TRITON_INTERPRET=1 set
before triton is imported). Every implementation returns fp32 results with the same conventions:
target ids < 0 are ignored rows (logprob 0, entropy 0, no gradient); logprobs are <= 0 and entropies >= 0;
padded vocabulary rows must be sliced off the weight (or logits) by the caller, since every column counts.
Under tensor parallelism the caller supplies the cross-rank reduction (`reduce_shards`, see `partials.py`):
`guide_mega.training.vocab_parallel` owns the process group and its all-reduce.
"""

from __future__ import annotations

import importlib
import os
from typing import Literal

import torch

from .chunked import logprob_partials_chunked, logprob_partials_from_logits_chunked
from .partials import LogprobPartials, ShardReduce, TokenLogprobs, combine_partials
from .reference import logprob_partials_from_logits_reference, logprob_partials_reference

Impl = Literal["auto", "triton", "chunked", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "chunked", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """The concrete implementation ('triton', 'chunked' or 'reference') that `impl` runs on this input."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda and tensor.dtype in _TRITON_DTYPES else "chunked"
    if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    if impl == "triton" and tensor.dtype not in _TRITON_DTYPES:
        raise ValueError(f"impl='triton' supports {_TRITON_DTYPES}, got {tensor.dtype}")
    return impl


def _triton_kernels(module: str):
    """A Triton module, imported on first use so that importing this package never imports triton."""
    return importlib.import_module(f".{module}", __package__)


def _check_targets(target_ids_T: torch.Tensor, num_tokens: int, temperature: float) -> None:
    if target_ids_T.dim() != 1 or target_ids_T.shape[0] != num_tokens:
        raise ValueError(f"target_ids_T must be [T={num_tokens}], got {tuple(target_ids_T.shape)}")
    if target_ids_T.dtype.is_floating_point:
        raise ValueError(f"target_ids_T must hold integer ids, got {target_ids_T.dtype}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprob_partials(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
    impl: Impl = "auto",
) -> LogprobPartials:
    """This shard's fp32 partials [T] (see `partials.py`) of softmax(hidden_TH @ weight_VH^T / temperature).

    weight_VH holds global vocabulary ids [vocab_start, vocab_start + V_local); target ids outside it add nothing.
    """
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2 or hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"need hidden [T, H] and weight [V, H], got {tuple(hidden_TH.shape)}, {tuple(weight_VH.shape)}"
        )
    _check_targets(target_ids_T, hidden_TH.shape[0], temperature)
    options = {"temperature": temperature, "vocab_start": vocab_start, "with_entropy": with_entropy}
    resolved = resolve_impl(impl, hidden_TH)
    if resolved == "triton":
        return _triton_kernels("kernel").logprob_partials_triton(hidden_TH, weight_VH, target_ids_T, **options)
    if resolved == "chunked":
        return logprob_partials_chunked(hidden_TH, weight_VH, target_ids_T, **options)
    return logprob_partials_reference(hidden_TH, weight_VH, target_ids_T, **options)


def logprob_partials_from_logits(
    logits_TV: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    with_entropy: bool = False,
    impl: Impl = "auto",
) -> LogprobPartials:
    """This shard's fp32 partials [T] from precomputed logits [T, V_local] (temperature applied here)."""
    if logits_TV.dim() != 2:
        raise ValueError(f"logits_TV must be [T, V], got {tuple(logits_TV.shape)}")
    _check_targets(target_ids_T, logits_TV.shape[0], temperature)
    options = {"temperature": temperature, "vocab_start": vocab_start, "with_entropy": with_entropy}
    resolved = resolve_impl(impl, logits_TV)
    if resolved == "triton":
        return _triton_kernels("logits_kernel").logprob_partials_from_logits_triton(logits_TV, target_ids_T, **options)
    if resolved == "chunked":
        return logprob_partials_from_logits_chunked(logits_TV, target_ids_T, **options)
    return logprob_partials_from_logits_reference(logits_TV, target_ids_T, **options)


def token_logprobs(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_start: int = 0,
    reduce_shards: ShardReduce | None = None,
    impl: Impl = "auto",
) -> TokenLogprobs:
    """fp32 logprobs [T] of target_ids_T under softmax(hidden_TH @ weight_VH^T / temperature), and entropies [T].

    Differentiable in hidden_TH and weight_VH for any per-token upstream gradients; the [T, V] logits are never
    materialised (except by impl="reference"). With the whole vocabulary in weight_VH, leave vocab_start and
    reduce_shards at their defaults. Under tensor parallelism pass this rank's vocabulary shard, its vocab_start
    and `reduce_shards`, the cross-rank reduction (two all-reduces of O(T); see
    `guide_mega.training.vocab_parallel`): every rank gets the full result. grad_hidden is then this shard's
    contribution: sum it over the group, as the backward of Megatron's copy_to_tensor_model_parallel_region does
    for the LM-head input.
    """
    partials = logprob_partials(
        hidden_TH,
        weight_VH,
        target_ids_T,
        temperature=temperature,
        vocab_start=vocab_start,
        with_entropy=with_entropy,
        impl=impl,
    )
    return combine_partials(partials, target_ids_T, reduce_shards=reduce_shards)


def token_logprobs_from_logits(
    logits_TV: torch.Tensor,
    target_ids_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_start: int = 0,
    reduce_shards: ShardReduce | None = None,
    impl: Impl = "auto",
) -> TokenLogprobs:
    """`token_logprobs` for callers that already hold the (vocabulary-parallel) logits [T, V_local]."""
    partials = logprob_partials_from_logits(
        logits_TV,
        target_ids_T,
        temperature=temperature,
        vocab_start=vocab_start,
        with_entropy=with_entropy,
        impl=impl,
    )
    return combine_partials(partials, target_ids_T, reduce_shards=reduce_shards)
