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
from guide_mega.algorithms.losses import importance_ratio, shaping_gamma
from guide_mega.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.architecture import read_architecture
from guide_mega.training.checkpoint import load_checkpoint, save_checkpoint, save_hf_checkpoint
from guide_mega.training.distributed import init_parallel
from guide_mega.training.logprobs import micro_batch_logprobs
from guide_mega.training.micro_batches import Context
from guide_mega.training.model_runner import ModelRunner
from guide_mega.training.train_step import LossInputs, make_policy_loss_fn
from guide_mega.training.weight_export import export_hf_weights
from guide_mega.types import TrainBatch


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
        shared = {
            "model": model,
            "parallel": parallel,
            "micro_batch_tokens": train.micro_batch_tokens,
            "share_prompts": train.share_prompts,
        }
        self.runner = ModelRunner(
            self.checkpoint_dir,
            self.arch,
            self.layout,
            optimizer=optimizer,
            lr=optimizer.lr,
            total_optimizer_steps=total_optimizer_steps,
            **shared,
        )
        self.reference = None
        if algorithm.kl_coef > 0:
            self.reference = ModelRunner(self.checkpoint_dir, self.arch, self.layout, **shared)

    @property
    def module(self) -> torch.nn.Module:
        """This rank's (unwrapped) GPTModel stage."""
        return self.runner.module

    @property
    def optimizer_steps(self) -> int:
        """Optimizer updates applied so far (kept across checkpoints)."""
        return self.runner.optimizer_steps

    @property
    def config(self):
        """The Megatron TransformerConfig (also the schedule's config)."""
        return self.runner.config

    def _logprobs_fn(self, runner: ModelRunner):
        def logprobs_fn(hidden_SBH: torch.Tensor, micro_batch) -> torch.Tensor:
            return micro_batch_logprobs(
                hidden_SBH,
                runner.module.output_weight(),
                micro_batch,
                vocab_size=self.arch.vocab_size,
                sequence_parallel=runner.config.sequence_parallel,
                temperature=self.temperature,
            ).logprobs_T

        return logprobs_fn

    def compute_logprobs(
        self, batch: TrainBatch, *, context: Context = "train", seqs: list[int] | None = None, reference: bool = False
    ) -> torch.Tensor:
        """Logprobs [T] (fp32, CPU; 0 outside `seqs`) of the response tokens under the chosen prompt context."""
        runner = self.reference if reference else self.runner
        return runner.forward_per_token(batch, self._logprobs_fn(runner), context=context, seqs=seqs)

    def compute_old_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Old logprobs [T]: each sample under the context it was sampled in (hinted for guided ones), recomputed
        by this policy at the step's start, or the engine's own (algorithm.old_logprobs='rollout')."""
        if self.algorithm.old_logprobs == "rollout":
            if batch.behaviour_logprobs_T is None:
                raise ValueError("algorithm.old_logprobs='rollout' but the engine returned no logprobs")
            return batch.behaviour_logprobs_T.float()
        return self.compute_logprobs(batch, context="sampled")

    def _guided_statistics(self, batch: TrainBatch, old_logprobs_T: torch.Tensor) -> tuple[float | None, dict]:
        """The step's shaping gamma (gamma_scope=global: once per step, so it is split-invariant; None under
        micro_batch scope) and hint-reliance metrics, from the guided samples under the hint-free prompt."""
        guide = self.algorithm.guide
        step_gamma = guide.gamma == "constant" or guide.gamma_scope == "global"
        guided = [seq for seq in range(batch.num_seqs) if bool(batch.is_guided_S[seq])]
        if not guided:
            return (guide.gamma_constant if step_gamma else None), {}
        plain_T = self.compute_logprobs(batch, context="train", seqs=guided)
        reliance = hint_reliance(old_logprobs_T, plain_T, batch.seq_ids_T, batch.is_guided_S)
        metrics = {name: float(value) for name, value in reliance.items()}
        if not step_gamma:
            return None, metrics
        quantile = guide.gamma_quantile if guide.gamma == "quantile" else None
        ratio_T = importance_ratio(plain_T, old_logprobs_T)
        gamma = shaping_gamma(ratio_T, batch.is_guided_T, quantile=quantile, constant=guide.gamma_constant)
        return float(gamma), metrics

    def plan_mini_batches(
        self, batch: TrainBatch, *, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor
    ) -> tuple[list[LossInputs], dict[str, float]]:
        """The loss inputs of each mini-batch (with the reference logprobs and the shaping gamma, computed once for
        the step), and the step's Guide metrics."""
        batch.check_per_token("old_logprobs_T", old_logprobs_T)
        batch.check_per_token("advantages_T", advantages_T)
        gamma, metrics = self._guided_statistics(batch, old_logprobs_T)
        ref_logprobs_T = self.compute_logprobs(batch, reference=True) if self.reference is not None else None
        lengths_S = batch.lengths_S.tolist()
        plans = [
            LossInputs(
                seqs=seqs,
                old_logprobs_T=old_logprobs_T,
                advantages_T=advantages_T,
                is_guided_T=batch.is_guided_T,
                ref_logprobs_T=ref_logprobs_T,
                gamma=gamma,
                global_num_tokens=float(sum(lengths_S[seq] for seq in seqs)),
                global_num_seqs=float(sum(lengths_S[seq] > 0 for seq in seqs)),
            )
            for seqs in mini_batch_sequences(batch.group_ids_S, self.train_config.mini_batches_per_step)
        ]
        return plans, metrics

    def train(self, batch: TrainBatch, *, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor) -> dict:
        """One RL step on the batch: one optimizer step per mini-batch of whole groups. Returns the Guide metrics,
        the loss metrics averaged over mini-batches and `actor/nonfinite_skipped` (see ModelRunner)."""
        plans, metrics = self.plan_mini_batches(batch, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T)
        mini_batches = [(plan.seqs, self.loss_fn(plan)) for plan in plans]
        return metrics | self.runner.train_mini_batches(batch, mini_batches, prefix="actor", loss_name="loss")

    def loss_fn(self, inputs: LossInputs):
        """The schedule's loss function for one mini-batch (Guide surrogate, KL and entropy terms)."""
        return make_policy_loss_fn(
            self.module.output_weight,
            inputs,
            self.algorithm,
            vocab_size=self.arch.vocab_size,
            sequence_parallel=self.config.sequence_parallel,
            temperature=self.temperature,
        )

    def save_checkpoint(self, root: str | Path, step: int, *, extra: dict | None = None) -> Path:
        """Atomic Megatron distributed checkpoint `<root>/step_<step>` (collective)."""
        extra = {"optimizer_steps": self.runner.optimizer_steps, **(extra or {})}
        return save_checkpoint(
            root,
            step,
            module=self.module,
            optimizer=self.runner.optimizer,
            scheduler=self.runner.scheduler,
            layout=self.layout,
            extra=extra,
        )

    def load_checkpoint(self, path: str | Path) -> tuple[int, dict]:
        """Restore from a checkpoint directory (verified); returns (step, extra)."""
        step, extra = load_checkpoint(
            path,
            module=self.module,
            optimizer=self.runner.optimizer,
            scheduler=self.runner.scheduler,
            layout=self.layout,
        )
        self.runner.optimizer_steps = extra.get("optimizer_steps", 0)
        return step, extra

    def save_hf(self, out_dir: str | Path) -> Path:
        """The current weights as an HF safetensors checkpoint (config and tokenizer copied from model.path)."""
        return save_hf_checkpoint(
            out_dir, module=self.module, arch=self.arch, layout=self.layout, source_dir=self.checkpoint_dir
        )

    def export_hf_weights(self, *, bucket_bytes: int = 512 << 20) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, full tensor) pairs of the current weights, bucket by bucket, on every rank."""
        return export_hf_weights(self.module, self.arch, self.layout, bucket_bytes=bucket_bytes)
