"""The RL loop (DESIGN.md §2): rollouts, rewards, Guide's second wave, advantages, train step, weight sync.

Every rank runs this SPMD under torchrun. The rollout engine, the reward pool and the logs live on global rank 0;
rank 0 builds the step's TrainBatch and broadcasts it, every rank trains its model shard, and the exported weights
(a collective) reach rank 0's engine.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from guide_mega.algorithms.advantages import gae_advantages_packed, terminal_rewards_packed
from guide_mega.config import Config
from guide_mega.data.batch import build_train_batch, sequence_advantages
from guide_mega.experience import Experience, ExperienceCollector
from guide_mega.rollout.engine import SamplingParams, bucket_named_tensors
from guide_mega.run_log import NullRunLog, RunLog
from guide_mega.types import TrainBatch

# The critic's checkpoints sit beside the policy's, under <checkpoint root>/critic/step_<n>.
CRITIC_DIR = "critic"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_object(value: object) -> object:
    """`value` from rank 0 on every rank (a no-op in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class PhaseTimer:
    """Wall time per phase of a step (rollout, reward, old logprobs, train, weight sync)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": value for phase, value in self.seconds.items()}


def rng_state() -> dict:
    """The Python, NumPy and torch RNG states as plain lists (checkpoint metadata stays JSON-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured, so sampling after a resume continues identically."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class Trainer:
    """Owns one run: the policy and, for GAE, the critic (every rank); on rank 0 the engine, rewards, prompt loader
    and logs."""

    def __init__(
        self, config: Config, *, policy, collector: ExperienceCollector | None, loader, run_log, critic=None
    ) -> None:
        self.config, self.policy, self.collector, self.loader = config, policy, collector, loader
        self.critic = critic
        self.run_log = run_log if run_log is not None else NullRunLog()
        self.is_main = _rank() == 0
        self.step_index = 0
        self._stop_requested = False
        self.evaluator = None
        """Rank 0, with train.eval_every: (step, is_last=) -> eval/ metrics (a PeriodicEvaluator)."""

    # -- one step ------------------------------------------------------------------------------------------
    def _sampling(self) -> SamplingParams:
        # A seed per step makes a resumed run sample exactly what the uninterrupted run would have.
        return dataclasses.replace(self.collector.sampling, seed=self.config.train.seed * 1_000_003 + self.step_index)

    def _collect(self, timer: PhaseTimer) -> tuple[TrainBatch | None, dict[str, float]]:
        """Rank 0: the step's experience packed into a TrainBatch (None when no group survived filtering)."""
        self.collector.sampling = self._sampling()
        with timer("rollout"):
            experience: Experience = self.collector.collect(self.loader.next_batch, self.config.train.prompts_per_step)
        metrics = {**experience.metrics, **self.loader.metrics, **self.collector.reward_pool.metrics}
        timer.seconds["reward"] = self.collector.reward_seconds
        timer.seconds["rollout"] -= self.collector.reward_seconds
        metrics["perf/rollout_tokens_per_s"] = experience.num_generated_tokens / max(timer.seconds["rollout"], 1e-9)
        if not experience.groups:
            return None, metrics
        if self.config.algorithm.estimator == "gae":
            # Per-token advantages need the critic's values, computed on every rank after the broadcast.
            return build_train_batch(experience.groups, None), metrics
        advantages_S = sequence_advantages(experience.groups, self.config.algorithm)
        return build_train_batch(experience.groups, advantages_S), metrics

    def _estimate_gae(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """PPO: value the batch with the critic and fill batch.advantages_T with GAE. Returns (old values [T],
        returns [T], metrics); every rank gets the same values, hence the same advantages."""
        algorithm = self.config.algorithm
        old_values_T = self.critic.compute_values(batch)
        rewards_T = terminal_rewards_packed(batch.rewards_S, batch.cu_seqlens_S1)
        advantages_T, returns_T = gae_advantages_packed(
            rewards_T, old_values_T, batch.cu_seqlens_S1, gamma=algorithm.gae_gamma, lam=algorithm.gae_lambda
        )
        batch.advantages_T = advantages_T
        metrics = {
            "critic/old_value_mean": float(old_values_T.mean()),
            "critic/return_mean": float(returns_T.mean()),
            "critic/advantage_mean": float(advantages_T.mean()),
            "critic/advantage_std": float(advantages_T.std()) if advantages_T.numel() > 1 else 0.0,
        }
        return old_values_T, returns_T, metrics

    def step(self) -> dict[str, float]:
        """One RL step; returns its metrics (identical on every rank)."""
        timer = PhaseTimer()
        start = time.perf_counter()
        batch, metrics = self._collect(timer) if self.is_main else (None, {})
        batch, metrics = _broadcast_object((batch, metrics))
        if metrics.get("filter/partial_batch") and self.config.algorithm.filter_zero_variance:
            self.run_log.message(
                f"step {self.step_index + 1}: {metrics['train/num_groups']:.0f} of {self.config.train.prompts_per_step}"
                f" groups have reward variance after {metrics['filter/rounds']:.0f} sampling rounds "
                "(algorithm.max_filter_rounds); training on those"
            )
        if batch is None:
            self.run_log.message(f"step {self.step_index + 1}: no group with reward variance; training skipped")
            metrics["train/skipped_step"] = 1.0
        else:
            with self._engine_asleep(timer):
                with timer("old_logprobs"):
                    self.policy.compute_old_logprobs(batch)
                metrics.update(_logprob_mismatch(batch))
                if self.critic is not None:
                    with timer("values"):
                        old_values_T, returns_T, gae_metrics = self._estimate_gae(batch)
                    metrics.update(gae_metrics)
                with timer("train"):
                    metrics.update(self.policy.train(batch))
                if self.critic is not None:
                    with timer("critic_train"):
                        metrics.update(self.critic.train(batch, returns_T=returns_T, old_values_T=old_values_T))
            with timer("weight_sync"):
                self._sync_weights()
            num_tokens = sum(len(ids) for ids in batch.train_prompt_ids) + batch.response_ids_T.numel()
            metrics["perf/train_tokens_per_s"] = num_tokens / max(timer.seconds["train"], 1e-9)
            metrics["train/skipped_step"] = 0.0
        metrics.update(timer.metrics())
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics

    @contextmanager
    def _engine_asleep(self, timer: PhaseTimer):
        """Colocated mode (train.colocate): the engine frees its GPU memory while the policy trains, and is awake
        again before the weight sync."""
        engine = self.collector.engine if self.collector is not None and self.config.train.colocate else None
        if engine is not None:
            with timer("engine_sleep"):
                engine.sleep()
        try:
            yield
        finally:
            if engine is not None:
                with timer("engine_wake"):
                    engine.wake()

    def _sync_weights(self) -> None:
        """Push the updated weights to the engine in buckets; every rank takes part in the export."""
        bucket_bytes = self.config.rollout.weight_bucket_mb << 20
        named_tensors = self.policy.export_hf_weights(bucket_bytes=bucket_bytes)
        if self.collector is None:
            for _ in named_tensors:  # other ranks still join each bucket's collectives
                pass
            return
        for bucket in bucket_named_tensors(named_tensors, bucket_bytes=bucket_bytes):
            self.collector.engine.update_weights(bucket)

    # -- the run -------------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        configured = self.config.checkpoint.dir
        return Path(configured) if configured else Path(self.config.logging.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Checkpoint policy, optimizer and the loop's state (data position, RNG) at the current step."""
        extra = _broadcast_object({"loader": self.loader.state_dict(), "rng": rng_state()} if self.is_main else None)
        if self.critic is not None:
            # Before the policy: a complete policy checkpoint then always has its critic beside it.
            self.critic.save_checkpoint(self.checkpoint_root() / CRITIC_DIR, self.step_index)
        path = self.policy.save_checkpoint(self.checkpoint_root(), self.step_index, extra=extra)
        if self.config.checkpoint.export_hf:
            self.policy.save_hf(Path(path) / "hf")
        from guide_mega.training.checkpoint import prune_checkpoints

        prune_checkpoints(self.checkpoint_root(), keep_last=self.config.checkpoint.keep_last)
        if self.critic is not None:
            prune_checkpoints(self.checkpoint_root() / CRITIC_DIR, keep_last=self.config.checkpoint.keep_last)
        self.run_log.message(f"checkpoint: {path}")
        return Path(path)

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights and optimizer, data position, RNG, and the engine's weights."""
        self.step_index, extra = self.policy.load_checkpoint(path)
        if self.critic is not None:
            self.critic.load_checkpoint(Path(path).parent / CRITIC_DIR / Path(path).name)
        if self.is_main:
            self.loader.load_state_dict(extra["loader"])
            set_rng_state(extra["rng"])
        self._sync_weights()
        self.run_log.message(f"resumed from {path} at step {self.step_index}")

    def close(self) -> None:
        """Stop the reward workers and release the engine (rank 0)."""
        if self.collector is not None:
            self.collector.reward_pool.close()
            self.collector.engine.close()

    def _on_sigterm(self, signum, frame) -> None:
        # Slurm sends SIGTERM before preemption or the time limit: finish the step, save, stop.
        self._stop_requested = True

    def fit(self) -> None:
        """Run until train.steps, checkpointing every checkpoint.every steps, at the end and on SIGTERM."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        every = self.config.checkpoint.every
        saved_at = self.step_index
        try:
            while self.step_index < self.config.train.steps:
                metrics = self.step()
                self.step_index += 1
                if self.evaluator is not None:
                    is_last = self.step_index == self.config.train.steps
                    metrics.update(self.evaluator(self.step_index, is_last=is_last))
                self.run_log.log(self.step_index, metrics)
                stop = bool(_broadcast_object(self._stop_requested))
                if stop or (every and self.step_index % every == 0):
                    self.save()
                    saved_at = self.step_index
                if stop:
                    self.run_log.message("SIGTERM: checkpoint written, stopping")
                    return
            if saved_at != self.step_index:
                self.save()
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_training(config: Config) -> Trainer:
    """Build the run, resume per checkpoint.resume (from the newest checkpoint that verifies), train to train.steps,
    and release engine and workers."""
    trainer = build_trainer(config)
    checkpoint, skipped = latest_checkpoint(
        trainer.checkpoint_root(), mode=config.checkpoint.resume, with_critic=trainer.critic is not None
    )
    for error in skipped:
        trainer.run_log.message(f"checkpoint skipped: {error}")
    if checkpoint is not None:
        trainer.resume(checkpoint)
    trainer.run_log.begin(trainer.step_index)
    try:
        trainer.fit()
    finally:
        trainer.run_log.close()
        trainer.close()
    return trainer


def latest_checkpoint(root: Path, *, mode: str, with_critic: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from under checkpoint.resume = auto | never | must, and why each newer one was
    skipped: the newest whose files (and, with_critic, its critic's) are all present, complete and uncorrupted.
    Collective: every rank calls it and gets the same answer."""
    if mode == "never":
        return None, []
    from guide_mega.training.checkpoint import newest_valid_checkpoint

    found, skipped = newest_valid_checkpoint(root, companions=[root / CRITIC_DIR] if with_critic else [])
    if found is None and mode == "must":
        reasons = "".join(f"; {error}" for error in skipped)
        raise ValueError(f"checkpoint.resume=must but {root} holds no complete, valid checkpoint{reasons}")
    return found, skipped


def _logprob_mismatch(batch: TrainBatch) -> dict[str, float]:
    """How far the trainer's old logprobs are from the engine's, on tokens sampled under the same context.

    This is the engine/trainer numerics gap (it should be ~0), kept apart from Guide's intended off-policy ratio.
    """
    if batch.behaviour_logprobs_T is None or batch.old_logprobs_T is None:
        return {}
    diff_T = (batch.old_logprobs_T - batch.behaviour_logprobs_T).abs()
    return {
        "rollout/trainer_logprob_abs_diff_mean": float(diff_T.mean()),
        "rollout/trainer_logprob_abs_diff_max": float(diff_T.max()),
    }


def build_trainer(config: Config) -> Trainer:
    """Everything a run needs, from its config: on every rank the policy; on rank 0 data, rewards and engine."""
    from transformers import AutoTokenizer

    from guide_mega.data import PromptLoader, load_prompt_source, render_prompt_ids, resolve_model_path
    from guide_mega.rewards import RewardPool
    from guide_mega.training.policy import MegatronPolicy

    model_dir = resolve_model_path(config.model.path) if _rank() == 0 else None
    model_dir = _broadcast_object(model_dir)
    policy = MegatronPolicy(**_model_options(config, model_dir), temperature=config.rollout.temperature)
    critic = _build_critic(config, model_dir)
    if _rank() != 0:
        return Trainer(config, policy=policy, collector=None, loader=None, run_log=None, critic=critic)
    engine = _build_engine(config, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_set = load_prompt_source(config.data.source, config.data)
    loader = PromptLoader.from_config(
        prompt_set.prompts, config.data, tokenizer=tokenizer, hint_template=config.algorithm.guide.hint_template
    )
    tokenize = lambda content: render_prompt_ids(tokenizer, content, system_prompt=config.data.system_prompt)  # noqa: E731
    collector = ExperienceCollector(
        engine,
        RewardPool.from_config(config.reward, lenient=config.reward.lenient),
        tokenize,
        algorithm=config.algorithm,
        sampling=SamplingParams.from_config(config.rollout),
        group_size=config.rollout.group_size,
    )
    trainer = Trainer(config, policy=policy, collector=collector, loader=loader, run_log=None, critic=critic)
    trainer.run_log = RunLog(config.logging.run_dir, config, total_steps=config.train.steps)
    if config.train.eval_every:
        trainer.evaluator, num_overlapping = _build_evaluator(config, collector, prompt_set.prompts)
        trainer.run_log.message(
            f"eval: {len(trainer.evaluator.prompts)} held-out problems from {config.data.eval_source} "
            f"({num_overlapping} left out: also in the training data)"
        )
    if prompt_set.num_skipped_rows or prompt_set.num_without_hint:
        trainer.run_log.message(
            f"data: {len(prompt_set.prompts)} prompts; {prompt_set.num_skipped_rows} malformed rows skipped; "
            f"{prompt_set.num_without_hint} problems without a usable hint"
        )
    return trainer


def _build_critic(config: Config, model_dir: Path):
    """The PPO critic (every rank) when the estimator is GAE, started from the policy's checkpoint; else None."""
    if config.algorithm.estimator != "gae":
        return None
    from guide_mega.training.critic import MegatronCritic

    return MegatronCritic(**_model_options(config, model_dir))


def _model_options(config: Config, model_dir: Path) -> dict:
    """The keyword arguments the policy and the critic share: the model at `model_dir` and the run's settings."""
    return {
        "model": dataclasses.replace(config.model, path=str(model_dir)),
        "parallel": config.parallel,
        "algorithm": config.algorithm,
        "optimizer": config.optimizer,
        "train": config.train,
        "total_optimizer_steps": config.train.steps * config.train.mini_batches_per_step,
    }


def _device(config: Config) -> str:
    if config.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.train.device


def _build_engine(config: Config, model_dir: Path):
    """Rank 0's rollout engine: HF, a colocated sglang.Engine, or a client of a separate SGLang server, which gets
    weights over an NCCL group when rollout.sglang_weight_group is set and through a shared directory otherwise."""
    from guide_mega.rollout.factory import create_rollout_engine

    engine = create_rollout_engine(model_dir, config.rollout, device=_device(config))
    group = config.rollout.sglang_weight_group
    if config.rollout.engine == "sglang" and config.rollout.sglang_url and group:
        host, _, port = group.rpartition(":")
        backend = "nccl" if _device(config) == "cuda" else "gloo"
        engine.init_weight_group(master_address=host, master_port=int(port), backend=backend)
    return engine


def _build_evaluator(config: Config, collector: ExperienceCollector, training_prompts: list):
    """The PeriodicEvaluator of train.eval_every on data.eval_source minus any problem also in the training data,
    and how many those were."""
    from guide_mega.data import load_prompt_source
    from guide_mega.evaluation.runner import EvalSettings, PeriodicEvaluator

    if not config.data.eval_source:
        raise ValueError("train.eval_every needs data.eval_source (held-out problems)")
    eval_data = dataclasses.replace(config.data, source_options=config.data.eval_source_options)
    seen = {repr(prompt.prompt) for prompt in training_prompts}
    candidates = load_prompt_source(config.data.eval_source, eval_data).prompts
    prompts = [prompt for prompt in candidates if repr(prompt.prompt) not in seen]
    if not prompts:
        raise ValueError(f"data.eval_source {config.data.eval_source!r}: every problem is also in the training data")
    settings = EvalSettings(
        num_samples=config.train.eval_samples,
        sampling=SamplingParams.from_config(config.rollout, seed=config.train.seed),
        max_prompt_tokens=config.data.max_prompt_tokens,
    )
    return PeriodicEvaluator(
        engine=collector.engine, reward_pool=collector.reward_pool, prompts=prompts, tokenize=collector.tokenize,
        settings=settings, every=config.train.eval_every, output_dir=Path(config.logging.run_dir) / "eval",
    ), len(candidates) - len(prompts)  # fmt: skip
