"""The policy as a Megatron model: forward-only logprobs, the Guide train step, weight export.

Shape legend: T response tokens of the batch, S sequences.

Every rank calls the same methods with the same TrainBatch (SPMD under torchrun); each data-parallel rank works
on its share of the sequences and results are shared so that every rank returns the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from guide_mega.algorithms.guide import hint_reliance
from guide_mega.algorithms.losses import shaping_gamma
from guide_mega.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.architecture import read_architecture, transformer_config
from guide_mega.training.checkpoint import load_checkpoint, save_checkpoint, save_hf_checkpoint
from guide_mega.training.distributed import init_parallel
from guide_mega.training.forward import (
    all_gather_data_parallel,
    broadcast_from_last_stage,
    broadcast_object_from_last_stage,
    run_schedule,
)
from guide_mega.training.logprobs import micro_batch_logprobs
from guide_mega.training.micro_batches import Context, plan_micro_batches, sequence_lengths, shard_for_data_parallel
from guide_mega.training.model import build_gpt_model, transformer_engine_available
from guide_mega.training.optimizer import build_optimizer, wrap_data_parallel
from guide_mega.training.train_step import StepTensors, make_policy_loss_fn, reduce_step_metrics
from guide_mega.training.weight_export import export_hf_weights
from guide_mega.training.weight_loading import load_hf_weights
from guide_mega.types import TrainBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_directory(model: ModelConfig) -> Path:
    """model.path as an HF checkpoint directory (the trainer resolves 'embedded:' names before building)."""
    path = Path(model.path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path {model.path!r} is not an HF checkpoint directory with a config.json")
    return path


def mini_batch_sequences(group_ids_S: torch.Tensor, num_mini_batches: int) -> list[list[int]]:
    """Split the sequences into mini-batches of whole groups (in order of first appearance)."""
    groups = list(dict.fromkeys(group_ids_S.tolist()))
    if len(groups) < num_mini_batches:
        raise ValueError(f"train.mini_batches_per_step={num_mini_batches} exceeds the batch's {len(groups)} groups")
    chunks = np.array_split(np.array(groups), num_mini_batches)
    members = [set(chunk.tolist()) for chunk in chunks]
    return [[seq for seq, group in enumerate(group_ids_S.tolist()) if group in chunk] for chunk in members]


class MegatronPolicy:
    """The trainable policy (plus a frozen reference when algorithm.kl_coef > 0) on this rank's model shard."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        parallel: ParallelConfig,
        algorithm: AlgorithmConfig,
        optimizer: OptimizerConfig,
        train: TrainConfig,
        total_optimizer_steps: int,
        temperature: float = 1.0,
    ) -> None:
        if parallel.context > 1:
            raise NotImplementedError("parallel.context > 1 is not supported by the Megatron backend yet")
        self.checkpoint_dir = checkpoint_directory(model)
        self.arch = read_architecture(self.checkpoint_dir)
        self.layout = init_parallel(tensor=parallel.tensor, pipeline=parallel.pipeline, seed=train.seed)
        self.algorithm, self.train_config, self.temperature = algorithm, train, temperature
        self.dtype = DTYPES[model.dtype]
        self.config = transformer_config(
            self.arch,
            tensor_parallel=parallel.tensor,
            pipeline_parallel=parallel.pipeline,
            sequence_parallel=parallel.sequence_parallel,
            dtype=self.dtype,
            recompute=model.recompute,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        self.packed = transformer_engine_available()
        self.pad_multiple = parallel.tensor if parallel.sequence_parallel else 1
        module = build_gpt_model(self.arch, self.config, self.layout)
        load_hf_weights(module, self.checkpoint_dir, self.arch, self.layout)
        self.module = module
        self.model = [wrap_data_parallel(module, self.config)]
        self.optimizer, self.scheduler = build_optimizer(
            self.model[0], optimizer, lr=optimizer.lr, total_steps=total_optimizer_steps, dtype=self.dtype
        )
        self.reference = None
        if algorithm.kl_coef > 0:
            self.reference = build_gpt_model(self.arch, self.config, self.layout).requires_grad_(False)
            load_hf_weights(self.reference, self.checkpoint_dir, self.arch, self.layout)
        self.optimizer_steps = 0

    def _micro_batches(self, batch: TrainBatch, seqs: list[int], context: Context):
        lengths = sequence_lengths(batch, context)
        mine = shard_for_data_parallel(seqs, lengths, data_parallel=self.layout.data, data_rank=self.layout.data_rank)
        return plan_micro_batches(
            batch,
            mine,
            context=context,
            max_tokens=self.train_config.micro_batch_tokens,
            packed=self.packed,
            pad_multiple=self.pad_multiple,
            device=self.layout.device,
        )

    @torch.no_grad()
    def compute_logprobs(
        self, batch: TrainBatch, *, context: Context = "train", seqs: list[int] | None = None, reference: bool = False
    ) -> torch.Tensor:
        """Logprobs [T] (fp32, CPU; 0 outside `seqs`) of the response tokens under the chosen prompt context."""
        seqs = list(range(batch.num_seqs)) if seqs is None else seqs
        module = self.reference if reference else self.module
        micro_batches = self._micro_batches(batch, seqs, context)
        num_tokens = batch.response_ids_T.numel()
        logprobs_T = torch.zeros(num_tokens, dtype=torch.float32, device=self.layout.device)

        def loss_fn(hidden_SBH, micro_batch):
            result = micro_batch_logprobs(
                hidden_SBH,
                module.output_weight(),
                micro_batch,
                vocab_size=self.arch.vocab_size,
                sequence_parallel=self.config.sequence_parallel,
                temperature=self.temperature,
            )
            logprobs_T[micro_batch.token_index_N.to(logprobs_T.device)] = result.logprobs_T
            return result.logprobs_T.sum() * 0.0, {}

        if micro_batches:
            run_schedule([module], micro_batches, loss_fn, forward_only=True, explicit_causal_mask=not self.packed)
        logprobs_T = broadcast_from_last_stage(
            logprobs_T, shape=(num_tokens,), dtype=torch.float32, device=self.layout.device
        )
        return all_gather_data_parallel(logprobs_T).cpu()

    def compute_old_logprobs(self, batch: TrainBatch) -> None:
        """Fill batch.old_logprobs_T: each sample under the context it was sampled in (hinted for guided ones)."""
        if self.algorithm.old_logprobs == "rollout":
            if batch.behaviour_logprobs_T is None:
                raise ValueError("algorithm.old_logprobs='rollout' but TrainBatch.behaviour_logprobs_T is None")
            batch.old_logprobs_T = batch.behaviour_logprobs_T.float()
            return
        batch.old_logprobs_T = self.compute_logprobs(batch, context="sampled")

    def _guided_statistics(self, batch: TrainBatch) -> tuple[float, dict[str, float]]:
        """The shaping gamma (once per step, so it is split-invariant) and hint-reliance metrics."""
        guide = self.algorithm.guide
        guided = [seq for seq in range(batch.num_seqs) if bool(batch.is_guided_S[seq])]
        if not guided:
            return guide.gamma_constant, {}
        plain_T = self.compute_logprobs(batch, context="train", seqs=guided)
        guided_T = batch.is_guided_T
        ratio_T = torch.exp((plain_T - batch.old_logprobs_T).clamp(-20.0, 20.0))
        quantile = guide.gamma_quantile if guide.gamma == "quantile" else None
        gamma = float(shaping_gamma(ratio_T, guided_T, quantile=quantile, constant=guide.gamma_constant))
        reliance = hint_reliance(batch.old_logprobs_T, plain_T, batch.seq_ids_T, batch.is_guided_S)
        return gamma, {name: float(value) for name, value in reliance.items()}

    def plan_step(self, batch: TrainBatch) -> tuple[list[StepTensors], dict[str, float]]:
        """Old (and reference) logprobs, the shaping gamma, and the loss inputs of each mini-batch."""
        if batch.old_logprobs_T is None:
            self.compute_old_logprobs(batch)
        gamma, metrics = self._guided_statistics(batch)
        ref_logprobs_T = self.compute_logprobs(batch, reference=True) if self.reference is not None else None
        lengths_S = (batch.cu_seqlens_S1[1:] - batch.cu_seqlens_S1[:-1]).tolist()
        steps = [
            StepTensors(
                seqs=seqs,
                old_logprobs_T=batch.old_logprobs_T,
                advantages_T=batch.advantages_T,
                is_guided_T=batch.is_guided_T,
                ref_logprobs_T=ref_logprobs_T,
                gamma=gamma,
                global_num_tokens=float(sum(lengths_S[seq] for seq in seqs)),
                global_num_seqs=float(sum(lengths_S[seq] > 0 for seq in seqs)),
            )
            for seqs in mini_batch_sequences(batch.group_ids_S, self.train_config.mini_batches_per_step)
        ]
        metrics["guide/shaping_gamma"] = gamma
        return steps, metrics

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One RL step on the batch: one optimizer step per mini-batch; metrics are averaged over mini-batches."""
        steps, metrics = self.plan_step(batch)
        totals: dict[str, float] = {}
        for step in steps:
            for name, value in self._optimizer_step(batch, step).items():
                totals[name] = totals.get(name, 0.0) + value / len(steps)
        return {**metrics, **totals}

    def accumulate_gradients(self, batch: TrainBatch, step: StepTensors) -> list[dict[str, torch.Tensor]]:
        """Zero, then fill the (data-parallel reduced) gradients of the mini-batch's loss; loss_fn outputs."""
        micro_batches = self._micro_batches(batch, step.seqs, "train")
        self.model[0].zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_fn = make_policy_loss_fn(
            self.module.output_weight,
            step,
            self.algorithm,
            vocab_size=self.arch.vocab_size,
            sequence_parallel=self.config.sequence_parallel,
            temperature=self.temperature,
        )
        if not micro_batches:
            # No sequence for this data-parallel rank: still join the gradient reduction.
            self.config.finalize_model_grads_func(self.model)
            return []
        return run_schedule(
            self.model, micro_batches, loss_fn, forward_only=False, explicit_causal_mask=not self.packed
        )

    def _optimizer_step(self, batch: TrainBatch, step: StepTensors) -> dict[str, float]:
        outputs = self.accumulate_gradients(batch, step)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(1)
            self.optimizer_steps += 1
        metrics = reduce_step_metrics(outputs, device=self.layout.device) if self.layout.is_last_stage else None
        metrics = broadcast_object_from_last_stage(metrics)
        metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["actor/update_skipped"] = float(not updated)
        return metrics

    def save_checkpoint(self, root: str | Path, step: int, *, extra: dict | None = None) -> Path:
        """Atomic Megatron distributed checkpoint `<root>/step_<step>` (collective)."""
        extra = {"optimizer_steps": self.optimizer_steps, **(extra or {})}
        return save_checkpoint(
            root,
            step,
            module=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            layout=self.layout,
            extra=extra,
        )

    def load_checkpoint(self, path: str | Path) -> tuple[int, dict]:
        """Restore from a checkpoint directory (verified); returns (step, extra)."""
        step, extra = load_checkpoint(
            path, module=self.module, optimizer=self.optimizer, scheduler=self.scheduler, layout=self.layout
        )
        self.optimizer_steps = extra.get("optimizer_steps", 0)
        return step, extra

    def save_hf(self, out_dir: str | Path) -> Path:
        """The current weights as an HF safetensors checkpoint (config and tokenizer copied from model.path)."""
        return save_hf_checkpoint(
            out_dir, module=self.module, arch=self.arch, layout=self.layout, source_dir=self.checkpoint_dir
        )

    def export_hf_weights(self, *, bucket_bytes: int = 512 << 20) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, full tensor) pairs of the current weights, bucket by bucket, on every rank."""
        return export_hf_weights(self.module, self.arch, self.layout, bucket_bytes=bucket_bytes)
