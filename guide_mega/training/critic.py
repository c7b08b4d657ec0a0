"""The PPO / Guide-PPO critic: the policy's architecture with a scalar value head, on the same Megatron machinery.

Shape legend: T response tokens of the batch, N response tokens of a micro-batch, S sequence positions, B rows.

The value of response token t is read at the position that predicts it (the state before the token is
generated), so values line up with logprobs. Guide-PPO evaluates the critic on the hint-free prompt (context
"train") for every sample, guided or not: the value function is the one of the policy being trained.
The decoder starts from the HF checkpoint and the head from zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from guide_mega.algorithms.advantages import gae_advantages_packed, terminal_rewards_packed
from guide_mega.algorithms.losses import aggregate_loss, value_loss
from guide_mega.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.architecture import read_architecture
from guide_mega.training.checkpoint import load_checkpoint, save_checkpoint
from guide_mega.training.data_parallel import local_mini_batches, token_statistics
from guide_mega.training.distributed import init_parallel
from guide_mega.training.micro_batches import MicroBatch
from guide_mega.training.model_runner import ModelRunner
from guide_mega.training.policy import checkpoint_directory, step_counts
from guide_mega.types import TrainBatch


def micro_batch_values(values_SB: torch.Tensor, micro_batch: MicroBatch, *, sequence_parallel: bool) -> torch.Tensor:
    """Values [N] of the micro-batch's response tokens from the critic's last-stage output [S, B]."""
    if sequence_parallel:
        # Each rank evaluated its own slice of positions with the replicated head; the backward keeps the slice.
        values_SB = gather_from_sequence_parallel_region(values_SB, tensor_parallel_output_grad=False)
    return values_SB.transpose(0, 1).reshape(-1)[micro_batch.flat_index_N]


def estimate_gae(critic: MegatronCritic, batch: TrainBatch, *, gamma: float, lam: float) -> tuple:
    """PPO: value this rank's share with the critic; returns (old values [T], GAE advantages [T], returns [T],
    metrics over every data-parallel rank's share). GAE runs within each sequence, so shares are independent."""
    old_values_T = critic.compute_values(batch)
    rewards_T = terminal_rewards_packed(batch.rewards_S, batch.cu_seqlens_S1)
    advantages_T, returns_T = gae_advantages_packed(rewards_T, old_values_T, batch.cu_seqlens_S1, gamma=gamma, lam=lam)
    metrics = {}
    for name, values_T in (("old_value", old_values_T), ("return", returns_T), ("advantage", advantages_T)):
        stats = token_statistics(values_T)
        if stats:
            metrics[f"critic/{name}_mean"] = stats["mean"]
    stats = token_statistics(advantages_T)
    if stats:
        metrics["critic/advantage_std"] = stats["std"]
    return old_values_T, advantages_T, returns_T, metrics


class MegatronCritic:
    """The value model on this rank's model shard (same parallel layout as the policy)."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        parallel: ParallelConfig,
        algorithm: AlgorithmConfig,
        optimizer: OptimizerConfig,
        train: TrainConfig,
        total_optimizer_steps: int,
    ) -> None:
        checkpoint_dir = checkpoint_directory(model)
        arch = read_architecture(checkpoint_dir)
        self.layout = init_parallel(tensor=parallel.tensor, pipeline=parallel.pipeline, seed=train.seed)
        self.algorithm, self.train_config = algorithm, train
        self.runner = ModelRunner(
            checkpoint_dir,
            arch,
            self.layout,
            model=model,
            parallel=parallel,
            micro_batch_tokens=train.micro_batch_tokens,
            share_prompts=train.share_prompts,
            critic=True,
            optimizer=optimizer,
            lr=optimizer.critic_lr,
            total_optimizer_steps=total_optimizer_steps,
        )

    def _values_fn(self, values_SB: torch.Tensor, micro_batch: MicroBatch) -> torch.Tensor:
        return micro_batch_values(values_SB, micro_batch, sequence_parallel=self.runner.config.sequence_parallel)

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        """Values [T] (fp32, CPU) of every response token under the hint-free prompt."""
        return self.runner.forward_per_token(batch, self._values_fn, context="train")

    def train(self, batch: TrainBatch, *, returns_T: torch.Tensor, old_values_T: torch.Tensor) -> dict[str, float]:
        """One optimizer step per mini-batch on the clipped value loss; metrics as `ModelRunner.train_mini_batches`
        gives them, under critic/."""
        batch.check_per_token("returns_T", returns_T)
        batch.check_per_token("old_values_T", old_values_T)
        seqs_per_mini_batch = local_mini_batches(batch, self.train_config.mini_batches_per_step)
        counts_M2 = step_counts(batch, seqs_per_mini_batch)
        mini_batches = [
            (seqs, self._loss_fn(returns_T, old_values_T, (float(counts_M2[m, 0]), float(counts_M2[m, 1]))))
            for m, seqs in enumerate(seqs_per_mini_batch)
        ]
        return self.runner.train_mini_batches(batch, mini_batches, prefix="critic", loss_name="critic/loss")

    def _loss_fn(self, returns_T: torch.Tensor, old_values_T: torch.Tensor, counts: tuple[float, float]):
        algorithm = self.algorithm

        def loss_fn(values_SB: torch.Tensor, micro_batch: MicroBatch):
            values_N = self._values_fn(values_SB, micro_batch).float()
            index_N = micro_batch.token_index_N
            returns_N = returns_T[index_N].to(values_N.device, torch.float32)
            loss_N, clipped_N = value_loss(
                values_N, old_values_T[index_N].to(values_N.device), returns_N, clip=algorithm.value_clip
            )
            mask_N = torch.ones_like(loss_N, dtype=torch.bool)
            loss = aggregate_loss(
                loss_N,
                mask_N,
                micro_batch.seq_ids_N,
                mode=algorithm.loss_aggregation,
                global_num_tokens=counts[0],
                global_num_seqs=counts[1],
                token_sum_scale=algorithm.token_sum_scale,
            )
            metrics = {
                "critic/loss": loss.detach(),
                "critic/value_mean": values_N.detach().mean(),
                "critic/value_error": (values_N.detach() - returns_N).abs().mean(),
                "critic/value_clip_frac": clipped_N.float().mean(),
            }
            return loss, {"num_tokens": torch.tensor(float(values_N.numel())), **metrics}

        return loss_fn

    def save_checkpoint(self, root: str | Path, step: int) -> Path:
        """Atomic Megatron distributed checkpoint of the critic `<root>/step_<step>` (collective)."""
        runner = self.runner
        return save_checkpoint(
            root, step, module=runner.module, optimizer=runner.optimizer, scheduler=runner.scheduler, layout=self.layout
        )

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore the critic from a checkpoint directory (verified); returns its step."""
        runner = self.runner
        step, _ = load_checkpoint(
            path, module=runner.module, optimizer=runner.optimizer, scheduler=runner.scheduler, layout=self.layout
        )
        return step
