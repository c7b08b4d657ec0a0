"""token_logprobs: every implementation against an fp64 ground truth, vocabulary shards, ignored rows, dispatch.

Shapes are small because, without a GPU, Triton runs under its interpreter. H=48 and V=300 are multiples of
neither the interpreter tiles (32 x 64, splits of 128) nor the GPU ones.
"""

import importlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from guide_mega.kernels import (
    IGNORE_INDEX,
    LogprobPartials,
    combine_partials,
    logprob_partials,
    token_logprobs,
    token_logprobs_from_logits,
)
from guide_mega.kernels.token_logprobs.chunked import logprob_partials_chunked
from guide_mega.kernels.token_logprobs.reference import (
    logprob_partials_from_logits_reference,
    token_logprobs_naive,
    token_logprobs_reference,
)

HIDDEN, VOCAB, TEMPERATURE = 48, 300, 0.7


def make_inputs(num_tokens, dtype, device, *, seed=0, vocab=VOCAB, logit_scale=3.0):
    """hidden [T, H], weight [V, H] in dtype with logits of std ~logit_scale; targets with ~1/8 ignored rows."""
    generator = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(num_tokens, HIDDEN, generator=generator)
    weight_VH = torch.randn(vocab, HIDDEN, generator=generator) * (logit_scale / HIDDEN**0.5)
    target_ids_T = torch.randint(0, vocab, (num_tokens,), generator=generator)
    target_ids_T[torch.rand(num_tokens, generator=generator) < 0.125] = IGNORE_INDEX
    upstream = torch.randn(2, num_tokens, generator=generator, dtype=torch.float64)
    return hidden_TH.to(device, dtype), weight_VH.to(device, dtype), target_ids_T.to(device), upstream.to(device)


def run_with_grads(compute, hidden_TH, weight_VH, upstream_2T):
    """Outputs and input gradients of compute(hidden, weight) under a random per-token upstream gradient."""
    hidden_TH = hidden_TH.detach().clone().requires_grad_()
    weight_VH = weight_VH.detach().clone().requires_grad_()
    logprobs_T, entropy_T = compute(hidden_TH, weight_VH)
    objective = (logprobs_T.double() * upstream_2T[0]).sum()
    if entropy_T is not None:
        objective = objective + (entropy_T.double() * upstream_2T[1]).sum()
    objective.backward()
    entropy_T = None if entropy_T is None else entropy_T.detach()
    return logprobs_T.detach(), entropy_T, hidden_TH.grad, weight_VH.grad


def check_against_truth(within_reference_error, compute, inputs, *, dtype, temperature, with_entropy):
    hidden_TH, weight_VH, target_ids_T, upstream_2T = inputs
    options = {"temperature": temperature, "with_entropy": with_entropy}
    truth = run_with_grads(
        lambda h, w: token_logprobs_reference(h, w, target_ids_T, **options),
        hidden_TH.double(),
        weight_VH.double(),
        upstream_2T,
    )
    same_dtype = run_with_grads(
        lambda h, w: token_logprobs_naive(h, w, target_ids_T, **options), hidden_TH, weight_VH, upstream_2T
    )
    actual = run_with_grads(compute, hidden_TH, weight_VH, upstream_2T)
    for name, got, ref, gt in zip(
        ("logprobs", "entropy", "grad_hidden", "grad_weight"), actual, same_dtype, truth, strict=True
    ):
        if gt is not None:
            within_reference_error(name, got, ref, gt, dtype=dtype)
    assert actual[0].dtype == torch.float32 and (actual[0] <= 0).all()
    return actual


@pytest.mark.parametrize("num_tokens", [1, 37, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_matches_fp64_truth_with_entropy(impl, dtype, num_tokens, device, within_reference_error):
    inputs = make_inputs(num_tokens, dtype, device, seed=num_tokens)
    target_ids_T = inputs[2]

    def compute(hidden_TH, weight_VH):
        return token_logprobs(hidden_TH, weight_VH, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl=impl)

    check_against_truth(
        within_reference_error, compute, inputs, dtype=dtype, temperature=TEMPERATURE, with_entropy=True
    )


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_logprobs_only_at_unit_temperature(impl, device, within_reference_error):
    inputs = make_inputs(37, torch.float32, device, seed=1)
    target_ids_T = inputs[2]
    actual = check_against_truth(
        within_reference_error,
        lambda h, w: token_logprobs(h, w, target_ids_T, impl=impl),
        inputs,
        dtype=torch.float32,
        temperature=1.0,
        with_entropy=False,
    )
    assert actual[1] is None


def _shard_partials(hidden_TH, weight_VH, target_ids_T, boundaries, impl):
    """Partials of each vocabulary shard [a, b), stacked [R, T] as if R tensor-parallel ranks had sent them."""
    shards = [
        logprob_partials(
            hidden_TH,
            weight_VH[start:stop],
            target_ids_T,
            temperature=TEMPERATURE,
            vocab_start=start,
            with_entropy=True,
            impl=impl,
        )
        for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True)
    ]
    fields = zip(*((p.max_T, p.sum_exp_T, p.target_logit_T, p.sum_exp_logit_T) for p in shards), strict=True)
    return LogprobPartials(*(torch.stack(values) for values in fields))


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_two_vocab_shards_match_unsplit(impl, device):
    """Emulated TP=2 (shards of 170 and 130 ids, so every target lives on exactly one of them)."""
    hidden_TH, weight_VH, target_ids_T, upstream_2T = make_inputs(37, torch.float32, device, seed=2)

    def unsplit(h, w):
        return token_logprobs(h, w, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl=impl)

    def split(h, w):
        return combine_partials(_shard_partials(h, w, target_ids_T, (0, 170, VOCAB), impl), target_ids_T)

    expected = run_with_grads(unsplit, hidden_TH, weight_VH, upstream_2T)
    actual = run_with_grads(split, hidden_TH, weight_VH, upstream_2T)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def _barrier_all_reduce(barrier: threading.Barrier, slots: list, rank: int, calls: list):
    """An all-reduce between threads (rank r writes slots[r]): what training passes as reduce_shards under TP."""

    def reduce_shards(tensor, op):
        calls.append((op, tuple(tensor.shape)))
        slots[rank] = tensor
        barrier.wait()
        stacked = torch.stack(slots)
        barrier.wait()  # every rank has read the slots before any writes its next tensor
        return stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0)

    return reduce_shards


def test_reduce_shards_merges_per_rank_partials(device):
    """Two emulated TP ranks, each with its own [T] partials and a caller-supplied reduction: each gets the unsplit
    outputs, and their gradients sum to the unsplit ones (the backward needs no reduction)."""
    hidden_TH, weight_VH, target_ids_T, upstream_2T = make_inputs(37, torch.float32, device, seed=7)
    boundaries, barrier, slots = (0, 170, VOCAB), threading.Barrier(2, timeout=60), [None, None]
    calls = [[], []]

    def rank_main(rank):
        start, stop = boundaries[rank], boundaries[rank + 1]
        reduce_shards = _barrier_all_reduce(barrier, slots, rank, calls[rank])

        def compute(h, w):
            options = {"temperature": TEMPERATURE, "with_entropy": True, "impl": "chunked"}
            return token_logprobs(
                h, w[start:stop], target_ids_T, vocab_start=start, reduce_shards=reduce_shards, **options
            )

        return run_with_grads(compute, hidden_TH, weight_VH, upstream_2T)

    with ThreadPoolExecutor(max_workers=2) as pool:
        ranks = [future.result() for future in [pool.submit(rank_main, rank) for rank in range(2)]]
    expected = run_with_grads(
        lambda h, w: token_logprobs(h, w, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl="chunked"),
        hidden_TH,
        weight_VH,
        upstream_2T,
    )
    assert calls == [[("max", (37,)), ("sum", (3, 37))]] * 2
    for logprobs_T, entropy_T, _, _ in ranks:
        torch.testing.assert_close(logprobs_T, expected[0], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(entropy_T, expected[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ranks[0][2] + ranks[1][2], expected[2], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ranks[0][3] + ranks[1][3], expected[3], rtol=2e-5, atol=2e-5)


def test_shard_without_the_target_contributes_no_target_logit(device):
    hidden_TH, weight_VH, _, _ = make_inputs(5, torch.float32, device)
    target_ids_T = torch.tensor([0, 10, 170, 299, IGNORE_INDEX], device=device)
    upper = logprob_partials(hidden_TH, weight_VH[170:], target_ids_T, vocab_start=170, impl="chunked")
    logits_TV = hidden_TH @ weight_VH.T
    expected_T = torch.tensor([0.0, 0.0, logits_TV[2, 170].item(), logits_TV[3, 299].item(), 0.0], device=device)
    torch.testing.assert_close(upper.target_logit_T, expected_T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_from_logits_matches_fp64_truth(impl, dtype, device, within_reference_error):
    hidden_TH, weight_VH, target_ids_T, upstream_2T = make_inputs(37, dtype, device, seed=3)
    logits_TV = (hidden_TH.float() @ weight_VH.float().T).to(dtype)

    def outputs(logits, compute):
        logits = logits.detach().clone().requires_grad_()
        result = compute(logits)
        (
            (result.logprobs_T.double() * upstream_2T[0]).sum() + (result.entropy_T.double() * upstream_2T[1]).sum()
        ).backward()
        return result.logprobs_T.detach(), result.entropy_T.detach(), logits.grad

    def reference(logits):
        partials = logprob_partials_from_logits_reference(
            logits, target_ids_T, temperature=TEMPERATURE, with_entropy=True
        )
        return combine_partials(partials, target_ids_T)

    truth = outputs(logits_TV.double(), reference)
    same_dtype = outputs(logits_TV, reference)
    actual = outputs(
        logits_TV,
        lambda logits: token_logprobs_from_logits(
            logits, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl=impl
        ),
    )
    for name, got, ref, gt in zip(("logprobs", "entropy", "grad_logits"), actual, same_dtype, truth, strict=True):
        within_reference_error(name, got, ref, gt, dtype=dtype)
    assert actual[2].dtype == dtype


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_ignored_rows_give_zero_and_no_gradient(impl, device):
    hidden_TH, weight_VH, target_ids_T, upstream_2T = make_inputs(37, torch.float32, device, seed=4)
    target_ids_T[::3] = IGNORE_INDEX

    def compute(h, w):
        return token_logprobs(h, w, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl=impl)

    logprobs_T, entropy_T, grad_hidden_TH, _ = run_with_grads(compute, hidden_TH, weight_VH, upstream_2T)
    ignored_T = target_ids_T < 0
    assert (logprobs_T[ignored_T] == 0).all() and (entropy_T[ignored_T] == 0).all()
    assert (grad_hidden_TH[ignored_T] == 0).all() and (grad_hidden_TH[~ignored_T] != 0).any()

    all_ignored_T = torch.full_like(target_ids_T, IGNORE_INDEX)
    _, _, grad_hidden_TH, grad_weight_VH = run_with_grads(
        lambda h, w: token_logprobs(h, w, all_ignored_T, with_entropy=True, impl=impl),
        hidden_TH,
        weight_VH,
        upstream_2T,
    )
    assert not grad_hidden_TH.any() and not grad_weight_VH.any()


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_logprob_never_positive_for_extreme_logits(impl, device):
    """Logits in the hundreds, targets at the arg-max (logprob ~ -0): no positive residue, nothing non-finite."""
    hidden_TH, weight_VH, _, _ = make_inputs(37, torch.float32, device, seed=5, logit_scale=300.0)
    target_ids_T = (hidden_TH @ weight_VH.T).argmax(dim=1)
    target_ids_T[1::2] = torch.randint(0, VOCAB, (18,), device=device)
    logprobs_T, entropy_T = token_logprobs(
        hidden_TH, weight_VH, target_ids_T, temperature=0.25, with_entropy=True, impl=impl
    )
    assert torch.isfinite(logprobs_T).all() and torch.isfinite(entropy_T).all()
    assert (logprobs_T <= 0).all() and (entropy_T >= 0).all()


def test_chunk_boundaries_do_not_change_results(device):
    """The chunked path with many small token and vocabulary chunks equals one big chunk."""
    hidden_TH, weight_VH, target_ids_T, upstream_2T = make_inputs(37, torch.float32, device, seed=6)

    def compute(token_chunk, vocab_chunk):
        def run(h, w):
            partials = logprob_partials_chunked(
                h,
                w,
                target_ids_T,
                temperature=TEMPERATURE,
                with_entropy=True,
                token_chunk=token_chunk,
                vocab_chunk=vocab_chunk,
            )
            return combine_partials(partials, target_ids_T)

        return run_with_grads(run, hidden_TH, weight_VH, upstream_2T)

    for got, want in zip(compute(8, 64), compute(1024, 4096), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_over_several_token_chunks(dtype, device, monkeypatch, within_reference_error):
    """Force a 32-token dlogits workspace so grad_weight is accumulated across chunks (fp32 accumulator)."""
    kernel = importlib.import_module("guide_mega.kernels.token_logprobs.kernel")
    monkeypatch.setattr(kernel, "_MAX_BACKWARD_TOKENS", 32)
    monkeypatch.setattr(kernel, "_BACKWARD_BUDGET_BYTES", 1)
    inputs = make_inputs(100, dtype, device, seed=7)
    target_ids_T = inputs[2]
    check_against_truth(
        within_reference_error,
        lambda h, w: token_logprobs(h, w, target_ids_T, temperature=TEMPERATURE, with_entropy=True, impl="triton"),
        inputs,
        dtype=dtype,
        temperature=TEMPERATURE,
        with_entropy=True,
    )


def test_auto_dispatch_and_validation(device):
    hidden_TH, weight_VH, target_ids_T, _ = make_inputs(8, torch.float32, device)
    auto = token_logprobs(hidden_TH, weight_VH, target_ids_T, impl="auto")
    expected_impl = "triton" if device.type == "cuda" else "chunked"
    forced = token_logprobs(hidden_TH, weight_VH, target_ids_T, impl=expected_impl)
    torch.testing.assert_close(auto.logprobs_T, forced.logprobs_T, rtol=0, atol=0)
    fp64 = token_logprobs(hidden_TH.double(), weight_VH.double(), target_ids_T, impl="auto")
    torch.testing.assert_close(fp64.logprobs_T, auto.logprobs_T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(hidden_TH, weight_VH, target_ids_T, impl="cuda")
    with pytest.raises(ValueError, match="supports"):
        token_logprobs(hidden_TH.double(), weight_VH.double(), target_ids_T, impl="triton")
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden_TH, weight_VH[:, :5], target_ids_T)
    with pytest.raises(ValueError, match="target_ids_T"):
        token_logprobs(hidden_TH, weight_VH, target_ids_T[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden_TH, weight_VH, target_ids_T, temperature=0.0)
