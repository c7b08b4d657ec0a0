"""One Megatron model on this rank (the policy, its frozen reference, or the critic) and how batches run through it.

Shape legend: T response tokens of the batch, N response tokens of a micro-batch, S sequence positions, B rows.

A runner builds its pipeline stage from the HF checkpoint, optionally wraps it for training (DDP, distributed
Adam, LR schedule), and runs a TrainBatch's sequences through Megatron's schedule: each data-parallel rank takes
its share of the sequences and cuts it into token-budgeted micro-batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from guide_mega.config import ModelConfig, OptimizerConfig, ParallelConfig
from guide_mega.training.architecture import ModelArchitecture, transformer_config
from guide_mega.training.distributed import ParallelLayout
from guide_mega.training.forward import (
    LossFn,
    broadcast_from_last_stage,
    broadcast_object_from_last_stage,
    run_schedule,
)
from guide_mega.training.micro_batches import (
    Context,
    MicroBatch,
    plan_micro_batches,
)
from guide_mega.training.model import (
    build_gpt_model,
    check_packed_attention_dtype,
    transformer_engine_available,
    transformer_engine_version,
)
from guide_mega.training.optimizer import build_optimizer, wrap_data_parallel
from guide_mega.training.train_step import gradients_are_finite, reduce_step_metrics
from guide_mega.training.weight_loading import load_hf_weights
from guide_mega.types import TrainBatch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Metric suffix: optimizer steps skipped because the loss or a gradient was NaN or Inf (summed, not averaged).
NONFINITE_SKIPPED = "nonfinite_skipped"
PerTokenFn = Callable[[torch.Tensor, MicroBatch], torch.Tensor]


class ModelRunner:
    """A Megatron model stage loaded from an HF checkpoint; trainable when given optimizer settings."""

    def __init__(
        self,
        checkpoint_dir: Path,
        arch: ModelArchitecture,
        layout: ParallelLayout,
        *,
        model: ModelConfig,
        parallel: ParallelConfig,
        micro_batch_tokens: int,
        share_prompts: bool = True,
        critic: bool = False,
        optimizer: OptimizerConfig | None = None,
        lr: float = 0.0,
        total_optimizer_steps: int = 1,
    ) -> None:
        self.arch, self.layout, self.micro_batch_tokens = arch, layout, micro_batch_tokens
        if parallel.sequence_parallel and not transformer_engine_available():
            raise ValueError(
                "parallel.sequence_parallel needs Transformer Engine (the local spec's torch norms do not support it)"
            )
        self.dtype = DTYPES[model.dtype]
        self.config = transformer_config(
            arch,
            tensor_parallel=parallel.tensor,
            pipeline_parallel=parallel.pipeline,
            sequence_parallel=parallel.sequence_parallel,
            dtype=self.dtype,
            recompute=model.recompute,
            use_cpu_initialization=not torch.cuda.is_available(),
            fused=transformer_engine_available(),
        )
        # THD packing needs Transformer Engine's attention; the local spec gets right-padded rows with an explicit
        # mask, which lets the samples of a prompt share one copy of it.
        self.packed = transformer_engine_available()
        if self.packed:
            check_packed_attention_dtype(self.dtype, transformer_engine_version())
        self.share_prompts = share_prompts and not self.packed
        self.pad_multiple = parallel.tensor if parallel.sequence_parallel else 1
        self.module = build_gpt_model(arch, self.config, layout, critic=critic)
        load_hf_weights(self.module, checkpoint_dir, arch, layout, critic=critic)
        self.model: list[torch.nn.Module] = [self.module]
        self.optimizer_steps = 0
        """Optimizer updates applied so far (skipped ones not counted); saved with checkpoints."""
        self.optimizer = self.scheduler = None
        if optimizer is not None:
            self.model = [wrap_data_parallel(self.module, self.config)]
            self.optimizer, self.scheduler = build_optimizer(
                self.model[0], optimizer, lr=lr, total_steps=total_optimizer_steps, dtype=self.dtype
            )
        else:
            self.module.requires_grad_(False)

    def micro_batches(self, batch: TrainBatch, seqs: list[int], context: Context) -> list[MicroBatch]:
        """This data-parallel rank's micro-batches over the sequences `seqs`."""
        return plan_micro_batches(
            batch,
            seqs,
            context=context,
            max_tokens=self.micro_batch_tokens,
            packed=self.packed,
            share_prompts=self.share_prompts,
            pad_multiple=self.pad_multiple,
            device=self.layout.device,
        )

    @torch.no_grad()
    def forward_per_token(
        self, batch: TrainBatch, per_token_fn: PerTokenFn, *, context: Context, seqs: list[int] | None = None
    ) -> torch.Tensor:
        """fp32 [T] on CPU, identical on the ranks of this model replica: per_token_fn(last-stage output,
        micro_batch) -> [N] for the response tokens of `seqs` (all sequences by default), 0 elsewhere."""
        seqs = list(range(batch.num_seqs)) if seqs is None else seqs
        num_tokens = batch.response_ids_T.numel()
        values_T = torch.zeros(num_tokens, dtype=torch.float32, device=self.layout.device)

        def collect(output, micro_batch: MicroBatch):
            values_N = per_token_fn(output, micro_batch).float()
            values_T[micro_batch.token_index_N.to(values_T.device)] = values_N
            return values_N.sum() * 0.0, {}

        micro_batches = self.micro_batches(batch, seqs, context)
        if micro_batches:
            run_schedule(self.model, micro_batches, collect, forward_only=True, explicit_causal_mask=not self.packed)
        values_T = broadcast_from_last_stage(values_T, shape=(num_tokens,), dtype=torch.float32, device=values_T.device)
        return values_T.cpu()

    def accumulate_gradients(
        self, batch: TrainBatch, seqs: list[int], loss_fn: LossFn, *, context: Context = "train"
    ) -> list[dict[str, torch.Tensor]]:
        """Zero, then fill the data-parallel-reduced gradients of the summed micro-batch losses of `seqs`."""
        micro_batches = self.micro_batches(batch, seqs, context)
        self.model[0].zero_grad_buffer()
        self.optimizer.zero_grad()
        if not micro_batches:
            # No sequence for this data-parallel rank: still join the gradient reduction.
            self.config.finalize_model_grads_func(self.model)
            return []
        return run_schedule(
            self.model, micro_batches, loss_fn, forward_only=False, explicit_causal_mask=not self.packed
        )

    def train_mini_batches(
        self,
        batch: TrainBatch,
        mini_batches: list[tuple[list[int], LossFn]],
        *,
        prefix: str,
        loss_name: str,
    ) -> dict[str, float]:
        """One optimizer step per mini-batch, given as (sequence indices, the schedule's loss function).

        Returns the loss functions' metrics and `{prefix}/grad_norm`, `lr`, `update_skipped`, averaged over the
        mini-batches, and `{prefix}/nonfinite_skipped`, the number of optimizer steps skipped for a NaN or Inf
        loss or gradient (summed). Collective: every rank calls it with the same arguments.
        """
        totals: dict[str, float] = {}
        for seqs, loss_fn in mini_batches:
            outputs = self.accumulate_gradients(batch, seqs, loss_fn)
            metrics = reduce_step_metrics(outputs, device=self.layout.device) if self.layout.is_last_stage else None
            metrics = broadcast_object_from_last_stage(metrics)
            update = self.optimizer_step_if_finite(metrics.get(loss_name, 0.0))
            if update is None:
                logger.warning(
                    "non-finite %s (%s) or gradient: optimizer step skipped", loss_name, metrics.get(loss_name)
                )
                update = {"update_skipped": 1.0, NONFINITE_SKIPPED: 1.0}
            else:
                update[NONFINITE_SKIPPED] = 0.0
                self.optimizer_steps += int(not update["update_skipped"])
            metrics.update({f"{prefix}/{name}": value for name, value in update.items()})
            for name, value in metrics.items():
                share = value if name == f"{prefix}/{NONFINITE_SKIPPED}" else value / len(mini_batches)
                totals[name] = totals.get(name, 0.0) + share
        return totals

    def optimizer_step_if_finite(self, loss: float) -> dict[str, float] | None:
        """`optimizer_step()`, unless the loss or any gradient (on any rank) is NaN or Inf: then the gradients are
        dropped and None returned. Collective over the whole world."""
        if gradients_are_finite(self.model, device=self.layout.device) and math.isfinite(loss):
            return self.optimizer_step()
        # One NaN or Inf in Adam's moments would poison every later step: this update is dropped, Adam and the LR
        # schedule never see it.
        self.model[0].zero_grad_buffer()
        self.optimizer.zero_grad()
        return None

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step Adam and the LR schedule (skipped on a non-finite gradient); returns the grad norm and the LR
        this step used."""
        lr = self.optimizer.param_groups[0]["lr"]
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(1)
        return {
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "lr": lr,
            "update_skipped": float(not updated),
        }
