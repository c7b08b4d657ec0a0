"""The policy as a Megatron model: forward-only logprobs, the Guide train step, weight export.

Shape legend: T response tokens of the batch, S sequences, N guided tokens.

Every rank calls the same methods (SPMD under torchrun) with its data-parallel rank's share of the step
(`data_parallel.plan_shares`; the ranks of one model replica hold the same share). Per-token results are the
share's; what needs the whole step (the loss normalisers, the shaping gamma, hint reliance, the loss metrics) is
reduced over the data-parallel group, so those are the same on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from guide_mega.algorithms.guide import hint_reliance, hint_reliance_by_level, hint_teacher_sequences
from guide_mega.algorithms.losses import importance_ratio, shaping_gamma
from guide_mega.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from guide_mega.training.architecture import read_architecture
from guide_mega.training.checkpoint import load_checkpoint, save_checkpoint, save_hf_checkpoint
from guide_mega.training.data_parallel import (
    gather_over_data_parallel,
    local_mini_batches,
    sum_over_data_parallel,
    token_statistics,
)
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


def logprob_mismatch(batch: TrainBatch, old_logprobs_T: torch.Tensor) -> dict[str, float]:
    """How far the trainer's old logprobs are from the engine's, on tokens sampled under the same context, over
    every data-parallel rank's share. This is the engine/trainer numerics gap (it should be ~0), kept apart from
    Guide's intended off-policy ratio."""
    if batch.behaviour_logprobs_T is None:
        return {}
    stats = token_statistics((old_logprobs_T - batch.behaviour_logprobs_T).abs())
    if not stats:
        return {}
    return {
        "rollout/trainer_logprob_abs_diff_mean": stats["mean"],
        "rollout/trainer_logprob_abs_diff_max": stats["max"],
    }


def step_counts(batch: TrainBatch, mini_batches: list[list[int]]) -> torch.Tensor:
    """Response tokens and non-empty sequences [M, 2] of each mini-batch over every data-parallel rank: the
    normalisers that make the loss of a rank's share part of the loss of the whole mini-batch."""
    lengths = batch.lengths_S.tolist()
    local_M2 = torch.tensor(
        [[sum(lengths[s] for s in seqs), sum(lengths[s] > 0 for s in seqs)] for seqs in mini_batches],
        dtype=torch.float64,
    ).reshape(len(mini_batches), 2)
    return sum_over_data_parallel(local_M2)


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
        """The step's shaping gamma (gamma_scope=global: once per step over every rank's guided tokens, so it is
        split-invariant; None under micro_batch scope) and hint-reliance metrics, from the guided samples under
        the hint-free prompt. Collective over the data-parallel group."""
        guide = self.algorithm.guide
        guided = [seq for seq in range(batch.num_seqs) if bool(batch.is_guided_S[seq])]
        plain_T = self.compute_logprobs(batch, context="train", seqs=guided)
        metrics = self._hint_reliance(batch, old_logprobs_T, plain_T)
        if guide.gamma == "constant":
            return guide.gamma_constant, metrics
        if guide.gamma_scope == "micro_batch":
            return None, metrics
        ratios_N = gather_over_data_parallel(importance_ratio(plain_T, old_logprobs_T)[batch.is_guided_T])
        every_N = torch.ones_like(ratios_N, dtype=torch.bool)
        return float(shaping_gamma(ratios_N, every_N, quantile=guide.gamma_quantile)), metrics

    @staticmethod
    def _hint_reliance(batch: TrainBatch, hinted_T: torch.Tensor, plain_T: torch.Tensor) -> dict[str, float]:
        """`hint_reliance` over the guided samples of every data-parallel rank, and per hint level l (mean over the
        guided samples sampled at l) as guide/level<l>_hint_reliance (absent when there are none)."""
        count = float((batch.is_guided_S & (batch.lengths_S > 0)).sum())
        local = hint_reliance(hinted_T, plain_T, batch.seq_ids_T, batch.is_guided_S)
        names = sorted(local)
        by_level_L2 = hint_reliance_by_level(hinted_T, plain_T, batch.seq_ids_T, batch.hint_level_S)
        overall = torch.tensor([float(local[name]) * count for name in names] + [count], dtype=torch.float64)
        totals = sum_over_data_parallel(torch.cat([overall, by_level_L2.flatten()]))
        if totals[len(names)] == 0:
            return {}
        metrics = {name: float(totals[index] / totals[len(names)]) for index, name in enumerate(names)}
        levels_L2 = totals[len(names) + 1 :].view(-1, 2).tolist()
        per_level = {f"guide/level{level}_hint_reliance": sum_ / n for level, (sum_, n) in enumerate(levels_L2) if n}
        return metrics | per_level

    def _hint_teacher(self, batch: TrainBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The hint teacher (algorithm.guide.teacher_coef > 0): logprobs [T] of each hint-free sample of a group
        with guided samples under that group's hinted prompt, at the step's start, and the bool mask [T] of those
        tokens; (None, None) when the term is off. A group is never split over data-parallel ranks, so its hinted
        prompt is on this rank. Collective over the model-parallel groups, like every forward."""
        if not self.algorithm.guide.teacher_coef:
            return None, None
        teacher_S = hint_teacher_sequences(batch.group_ids_S, batch.is_guided_S)
        students = [seq for seq in range(batch.num_seqs) if teacher_S[seq] >= 0]
        prompts = [batch.sampled_prompt_ids[teacher] if teacher >= 0 else own
                   for teacher, own in zip(teacher_S.tolist(), batch.sampled_prompt_ids, strict=True)]  # fmt: skip
        hinted = dataclasses.replace(batch, sampled_prompt_ids=prompts)
        return self.compute_logprobs(hinted, context="sampled", seqs=students), (teacher_S >= 0)[batch.seq_ids_T]

    def plan_mini_batches(
        self, batch: TrainBatch, *, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor
    ) -> tuple[list[LossInputs], dict[str, float]]:
        """The loss inputs of each mini-batch (with the reference logprobs and the shaping gamma, computed once for
        the step), and the step's Guide metrics."""
        batch.check_per_token("old_logprobs_T", old_logprobs_T)
        batch.check_per_token("advantages_T", advantages_T)
        gamma, metrics = self._guided_statistics(batch, old_logprobs_T)
        teacher_logprobs_T, is_student_T = self._hint_teacher(batch)
        ref_logprobs_T = self.compute_logprobs(batch, reference=True) if self.reference is not None else None
        mini_batches = local_mini_batches(batch, self.train_config.mini_batches_per_step)
        counts_M2 = step_counts(batch, mini_batches)
        plans = [
            LossInputs(
                seqs=seqs,
                old_logprobs_T=old_logprobs_T,
                advantages_T=advantages_T,
                is_guided_T=batch.is_guided_T,
                ref_logprobs_T=ref_logprobs_T,
                gamma=gamma,
                global_num_tokens=float(counts_M2[index, 0]),
                global_num_seqs=float(counts_M2[index, 1]),
                teacher_logprobs_T=teacher_logprobs_T,
                is_student_T=is_student_T,
            )
            for index, seqs in enumerate(mini_batches)
        ]
        return plans, metrics

    def train(self, batch: TrainBatch, *, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor) -> dict:
        """One RL step on the batch: one optimizer step per mini-batch of whole groups. Returns the Guide metrics,
        the loss metrics averaged over mini-batches and `actor/nonfinite_skipped` (see ModelRunner)."""
        plans, metrics = self.plan_mini_batches(batch, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T)
        mini_batches = [(plan.seqs, self.loss_fn(plan)) for plan in plans]
        metrics |= self.runner.train_mini_batches(batch, mini_batches, prefix="actor", loss_name="loss")
        if "actor/teacher_kl_sum" in metrics:
            metrics["actor/teacher_kl"] = metrics.pop("actor/teacher_kl_sum") / max(
                metrics["actor/teacher_tokens"], 1.0
            )
        return metrics

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
