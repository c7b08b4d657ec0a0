"""Build small MegatronPolicy instances and read their gradients in HF layout (shared by in-process tests and
the torchrun worker)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_advantages_T

from guide_mega.config import AlgorithmConfig, GuideConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.data_parallel import plan_shares, select_sequences, sum_over_data_parallel, token_positions
from guide_mega.training.forward import broadcast_object_from_last_stage
from guide_mega.training.optimizer import finalize_grads_without_token_scaling
from guide_mega.training.policy import MegatronPolicy
from guide_mega.training.train_step import reduce_step_metrics
from guide_mega.training.weight_export import export_hf_weights

# A micro-batch token budget that cuts the default tiny batch (make_train_batch, each group one shared-prompt row)
# into exactly four micro-batches.
FOUR_MICRO_BATCH_TOKENS = 12


def make_policy(
    checkpoint_dir: str | Path,
    *,
    tensor: int = 1,
    pipeline: int = 1,
    micro_batch_tokens: int = 4096,
    lr: float = 1e-3,
    loss_aggregation: str = "seq_mean_token_mean",
    mini_batches: int = 1,
    share_prompts: bool = True,
    dtype: str = "float32",
    gamma_scope: str = "global",
) -> MegatronPolicy:
    """A Guide-GRPO policy (shaping for guided tokens, fp32 unless told) on the tiny checkpoint."""
    guide = GuideConfig(enabled=True, gamma_scope=gamma_scope)
    algorithm = AlgorithmConfig(loss_aggregation=loss_aggregation, guide=guide)
    return MegatronPolicy(
        model=ModelConfig(path=str(checkpoint_dir), dtype=dtype),
        parallel=ParallelConfig(tensor=tensor, pipeline=pipeline),
        algorithm=algorithm,
        optimizer=OptimizerConfig(lr=lr, grad_clip=0.0),
        train=TrainConfig(
            micro_batch_tokens=micro_batch_tokens,
            mini_batches_per_step=mini_batches,
            prompts_per_step=4,
            share_prompts=share_prompts,
        ),
        total_optimizer_steps=100,
    )


def _finalize_with_all_reduce(model_chunks, num_tokens=None, **kwargs):
    # The distributed optimizer reduce-scatters gradients (each rank keeps its shard); all-reduce instead so that
    # every rank holds the full reduced gradient to compare.
    finalize_grads_without_token_scaling(model_chunks, num_tokens, **{**kwargs, "force_all_reduce": True})


def share_of(model, batch):
    """This rank's share of a whole batch, as the trainer would send it (`data_parallel.plan_shares`), and the
    share's token positions [T_share] in the batch; the batch itself with one data-parallel rank."""
    if model.layout.data == 1:
        return batch, torch.arange(batch.num_tokens)
    mini_batches = model.train_config.mini_batches_per_step
    seqs, labels = plan_shares(batch, num_mini_batches=mini_batches, data_parallel=model.layout.data)[
        model.layout.data_rank
    ]
    return select_sequences(batch, seqs, labels), token_positions(batch, seqs)


def whole_batch_values(model, batch, compute) -> torch.Tensor:
    """compute(share) -> [T_share] per-token values, put back in place: [T] of the whole batch on every rank."""
    share, index_T = share_of(model, batch)
    values_T = torch.zeros(batch.num_tokens)
    values_T[index_T] = compute(share)
    return sum_over_data_parallel(values_T)


def train_step(policy: MegatronPolicy, batch, *, old_logprobs_T=None, advantages_T=None) -> dict[str, float]:
    """policy.train on this rank's share of a tiny batch: old logprobs computed now and `tiny_advantages_T` unless
    given (both for the whole batch)."""
    share, index_T = share_of(policy, batch)
    old_logprobs_T = policy.compute_old_logprobs(share) if old_logprobs_T is None else old_logprobs_T[index_T]
    advantages_T = tiny_advantages_T(batch) if advantages_T is None else advantages_T
    return policy.train(share, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T[index_T])


def loss_and_gradients(policy: MegatronPolicy, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The first mini-batch's loss and its full reduced gradients in HF layout (identical on every rank)."""
    share, index_T = share_of(policy, batch)
    old_logprobs_T = policy.compute_old_logprobs(share)
    advantages_T = tiny_advantages_T(batch)[index_T]
    plans, _ = policy.plan_mini_batches(share, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T)
    policy.config.finalize_model_grads_func = _finalize_with_all_reduce
    outputs = policy.runner.accumulate_gradients(share, plans[0].seqs, policy.loss_fn(plans[0]))
    metrics = reduce_step_metrics(outputs, device=policy.layout.device) if policy.layout.is_last_stage else None
    metrics = broadcast_object_from_last_stage(metrics)
    gradients = {
        name: tensor.clone()
        for name, tensor in export_hf_weights(policy.module, policy.arch, policy.layout, gradients=True)
    }
    return metrics["loss"], gradients


def make_critic(checkpoint_dir: str | Path, *, tensor: int = 1, pipeline: int = 1, micro_batch_tokens: int = 4096):
    """An fp32 critic on the tiny checkpoint (token-mean value loss, value clip off)."""
    from guide_mega.training.critic import MegatronCritic

    return MegatronCritic(
        model=ModelConfig(path=str(checkpoint_dir), dtype="float32"),
        parallel=ParallelConfig(tensor=tensor, pipeline=pipeline),
        algorithm=AlgorithmConfig(estimator="gae", loss_aggregation="token_mean", value_clip=None),
        optimizer=OptimizerConfig(critic_lr=1e-2, grad_clip=0.0),
        train=TrainConfig(micro_batch_tokens=micro_batch_tokens, prompts_per_step=1),
        total_optimizer_steps=100,
    )


def critic_values_after_steps(critic, batch, *, steps: int) -> tuple[list[float], torch.Tensor]:
    """Train the critic (on this rank's share) toward returns = the sequence rewards for `steps` steps; (losses,
    final values [T] of the whole batch)."""
    share, _ = share_of(critic, batch)
    returns_T = share.rewards_S[share.seq_ids_T]
    losses = []
    for _ in range(steps):
        old_values_T = critic.compute_values(share)
        losses.append(critic.train(share, returns_T=returns_T, old_values_T=old_values_T)["critic/loss"])
    return losses, whole_batch_values(critic, batch, critic.compute_values)
