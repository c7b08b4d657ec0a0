"""vocab_parallel_token_logprobs over a real 2-process gloo group: each rank holds part of the vocabulary (TP=2
on CPU), the kernels return the shard's partials and training's all-reduce merges them."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guide_mega.kernels import IGNORE_INDEX
from guide_mega.training.vocab_parallel import vocab_parallel_token_logprobs

WORLD_SIZE, TOKENS, HIDDEN, VOCAB, SPLIT, TEMPERATURE = 2, 37, 48, 300, 170, 0.7


# The CPU tensors of a gloo group reach Triton only through its interpreter, which each rank turns on (below)
# before its first Triton call imports the kernel modules.
IMPLS = ("chunked", "triton")


def _inputs():
    generator = torch.Generator().manual_seed(11)
    hidden_TH = torch.randn(TOKENS, HIDDEN, generator=generator)
    weight_VH = torch.randn(VOCAB, HIDDEN, generator=generator) * (3.0 / HIDDEN**0.5)
    target_ids_T = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    target_ids_T[::5] = IGNORE_INDEX
    upstream_2T = torch.randn(2, TOKENS, generator=generator)
    return hidden_TH, weight_VH, target_ids_T, upstream_2T


def _forward_backward(hidden_TH, weight_VH, target_ids_T, upstream_2T, **options):
    hidden_TH = hidden_TH.clone().requires_grad_()
    weight_VH = weight_VH.clone().requires_grad_()
    logprobs_T, entropy_T = vocab_parallel_token_logprobs(
        hidden_TH, weight_VH, target_ids_T, temperature=TEMPERATURE, with_entropy=True, **options
    )
    ((logprobs_T * upstream_2T[0]).sum() + (entropy_T * upstream_2T[1]).sum()).backward()
    return logprobs_T.detach(), entropy_T.detach(), hidden_TH.grad, weight_VH.grad


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """One TP rank: its vocabulary shard, the group-combined outputs, grad_hidden summed as Megatron would."""
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        hidden_TH, weight_VH, target_ids_T, upstream_2T = _inputs()
        start, stop = (0, SPLIT) if rank == 0 else (SPLIT, VOCAB)
        results = {}
        for impl in IMPLS:
            outputs = _forward_backward(
                hidden_TH,
                weight_VH[start:stop],
                target_ids_T,
                upstream_2T,
                vocab_start=start,
                process_group=dist.group.WORLD,
                impl=impl,
            )
            dist.all_reduce(outputs[2])
            results[impl] = outputs
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gloo_tp2_matches_single_process(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    hidden_TH, weight_VH, target_ids_T, upstream_2T = _inputs()
    expected = _forward_backward(hidden_TH, weight_VH, target_ids_T, upstream_2T, impl="chunked")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for impl in IMPLS:
        for rank, shard in zip(range(WORLD_SIZE), (slice(0, SPLIT), slice(SPLIT, VOCAB)), strict=True):
            logprobs_T, entropy_T, grad_hidden_TH, grad_weight_VH = ranks[rank][impl]
            torch.testing.assert_close(logprobs_T, expected[0], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(entropy_T, expected[1], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(grad_hidden_TH, expected[2], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(grad_weight_VH, expected[3][shard], rtol=2e-5, atol=2e-5)
