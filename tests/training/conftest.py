"""Fixtures for the Megatron backend tests: tiny HF checkpoints, a clean single-process Megatron, torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the helpers below (tiny_models, dist_worker) sit beside the tests

from tiny_models import save_tiny_model  # noqa: E402
from torchrun_launch import run_torchrun  # noqa: E402

# (family, tied embeddings): Llama-3 untied, Qwen2 tied (with qkv bias), Qwen3 untied (with qk-norm).
FAMILIES = (("llama", False), ("qwen2", True), ("qwen3", False))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of a tiny random HF checkpoint (safetensors)."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for family, tied in FAMILIES:
        save_tiny_model(root / family, family, tied=tied)
        paths[family] = root / family
    return paths


@pytest.fixture
def single_process_megatron():
    """Megatron in this process as a world of one; torn down afterwards so other layouts can follow."""
    from guide_mega.training.distributed import destroy_parallel

    destroy_parallel()
    yield
    destroy_parallel()


@pytest.fixture(scope="session")
def single_process_reference(tiny_checkpoints) -> dict[str, dict]:
    """Per family, at TP = PP = DP = 1 in this process: logprobs under both contexts, and the first mini-batch's
    loss and gradients with one micro-batch ('loss', 'gradients') and with four ('loss_4', 'gradients_4')."""
    from policy_probes import FOUR_MICRO_BATCH_TOKENS, loss_and_gradients, make_policy
    from tiny_models import make_train_batch

    from guide_mega.training.distributed import destroy_parallel

    destroy_parallel()
    results = {}
    try:
        for family, checkpoint_dir in tiny_checkpoints.items():
            batch = make_train_batch()
            policy = make_policy(checkpoint_dir)
            entry = {
                "logprobs_train": policy.compute_logprobs(batch, context="train"),
                "logprobs_sampled": policy.compute_logprobs(batch, context="sampled"),
            }
            entry["loss"], entry["gradients"] = loss_and_gradients(policy, batch)
            split = make_policy(checkpoint_dir, micro_batch_tokens=FOUR_MICRO_BATCH_TOKENS)
            entry["num_micro_batches_4"] = len(split.runner.micro_batches(batch, list(range(batch.num_seqs)), "train"))
            entry["loss_4"], entry["gradients_4"] = loss_and_gradients(split, make_train_batch())
            results[family] = entry
    finally:
        destroy_parallel()
    return results


# name -> (tensor, pipeline, processes); data-parallel size = processes / (tensor * pipeline).
LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "tp2_pp2": (2, 2, 4), "dp2": (1, 1, 2)}


class LayoutRun:
    """Results of one dist_worker.py `layout` launch."""

    def __init__(self, name: str, out_dir: Path) -> None:
        self.name, self.out_dir = name, out_dir

    def load(self, family: str) -> dict:
        import torch

        return torch.load(self.out_dir / f"{family}.pt", weights_only=True)


@pytest.fixture(scope="session", params=list(LAYOUTS))
def layout_results(request, tiny_checkpoints, tmp_path_factory) -> LayoutRun:
    """One torchrun launch per parallel layout, shared by every test that asks for it."""
    tensor, pipeline, processes = LAYOUTS[request.param]
    out_dir = tmp_path_factory.mktemp(f"layout_{request.param}")
    families = [f"{family}={path}" for family, path in tiny_checkpoints.items()]
    run_torchrun(processes, "layout", str(out_dir), str(tensor), str(pipeline), *families)
    return LayoutRun(request.param, out_dir)


@pytest.fixture(scope="session")
def saved(tiny_checkpoints, tmp_path_factory):
    """Two real checkpoints (steps 1 and 2) of a trained tiny policy, saved once for the session (the checkpoint
    tests copy them before changing anything)."""
    from policy_probes import make_policy, train_step
    from tiny_models import make_train_batch

    from guide_mega.training.distributed import destroy_parallel

    destroy_parallel()
    root = tmp_path_factory.mktemp("checkpoints")
    try:
        policy = make_policy(tiny_checkpoints["llama"])
        train_step(policy, make_train_batch())
        for step in (1, 2):
            policy.save_checkpoint(root, step)
    finally:
        destroy_parallel()
    return root
