"""torchrun entry point of the distributed backend tests; each scenario writes its results for the test to check.

torchrun --nproc-per-node N dist_worker.py layout OUT_DIR TP PP FAMILY=DIR [FAMILY=DIR ...]
    per family: logprobs under both contexts, the loss and reduced gradients of the first mini-batch, an HF
    export (OUT_DIR/<family>_hf) and whether re-importing that export reproduces every parameter bit for bit;
    for qwen3 also the critic's values after two training steps.
torchrun --nproc-per-node N dist_worker.py checkpoint OUT_DIR PHASE CHECKPOINT_DIR MODEL_DIR
    PHASE=run:    train 3 steps, checkpoint after step 2, record every loss (the uninterrupted run).
    PHASE=resume: a fresh process restores the step-2 checkpoint and records step 3's loss.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from policy_probes import (  # noqa: E402
    critic_values_after_steps,
    loss_and_gradients,
    make_critic,
    make_policy,
    train_step,
    whole_batch_values,
)
from tiny_models import make_train_batch  # noqa: E402

from guide_mega.training.checkpoint import list_checkpoints  # noqa: E402
from guide_mega.training.weight_loading import load_hf_weights  # noqa: E402

# A budget that splits the tiny batch into several micro-batches per rank.
_MICRO_BATCH_TOKENS = 40


def _reimport_is_bit_exact(policy, export_dir: Path) -> bool:
    """Load the exported HF checkpoint into a fresh model stage and compare every local parameter bitwise."""
    from guide_mega.training.model import build_gpt_model

    fresh = build_gpt_model(policy.arch, policy.config, policy.layout)
    load_hf_weights(fresh, export_dir, policy.arch, policy.layout)
    original = dict(policy.module.named_parameters())
    same = all(torch.equal(param, original[name]) for name, param in fresh.named_parameters())
    flag = torch.tensor(int(same))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def run_layout(out_dir: Path, tensor: int, pipeline: int, families: dict[str, str]) -> None:
    for family, checkpoint_dir in families.items():
        batch = make_train_batch()
        policy = make_policy(checkpoint_dir, tensor=tensor, pipeline=pipeline, micro_batch_tokens=_MICRO_BATCH_TOKENS)
        results = {
            f"logprobs_{context}": whole_batch_values(policy, batch, partial(policy.compute_logprobs, context=context))
            for context in ("train", "sampled")
        }
        results["loss"], results["gradients"] = loss_and_gradients(policy, batch)
        export_dir = policy.save_hf(out_dir / f"{family}_hf")
        results["reimport_bit_exact"] = _reimport_is_bit_exact(policy, export_dir)
        if family == "qwen3":
            critic = make_critic(
                checkpoint_dir, tensor=tensor, pipeline=pipeline, micro_batch_tokens=_MICRO_BATCH_TOKENS
            )
            _, results["critic_values"] = critic_values_after_steps(critic, make_train_batch(), steps=2)
        if dist.get_rank() == 0:
            torch.save(results, out_dir / f"{family}.pt")


def run_checkpoint(out_dir: Path, phase: str, checkpoint_root: Path, model_dir: str) -> None:
    batch = make_train_batch()
    policy = make_policy(model_dir, micro_batch_tokens=_MICRO_BATCH_TOKENS)
    losses = {}
    if phase == "run":
        for step in (1, 2, 3):
            losses[step] = train_step(policy, batch)["loss"]  # old logprobs recomputed at each step's start
            if step == 2:
                policy.save_checkpoint(checkpoint_root, step)
    else:
        step, _ = policy.load_checkpoint(list_checkpoints(checkpoint_root)[-1])
        losses[step + 1] = train_step(policy, batch)["loss"]
    if dist.get_rank() == 0:
        torch.save(losses, out_dir / f"checkpoint_{phase}.pt")


def main(argv: list[str]) -> None:
    scenario, out_dir = argv[0], Path(argv[1])
    if scenario == "layout":
        families = dict(item.split("=", 1) for item in argv[4:])
        run_layout(out_dir, int(argv[2]), int(argv[3]), families)
    elif scenario == "checkpoint":
        run_checkpoint(out_dir, argv[2], Path(argv[3]), argv[4])
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
