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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from guide_mega.algorithms.advantages import gae_advantages_packed, terminal_rewards_packed
from guide_mega.algorithms.filtering import keep_groups_with_variance
from guide_mega.algorithms.guide import find_unsolved_groups, guide_metrics, merge_guided_groups
from guide_mega.config import AlgorithmConfig, Config
from guide_mega.data.batch import build_train_batch, sequence_advantages
from guide_mega.data.embedded_model import resolve_model_path
from guide_mega.experience import Tokenize, first_wave, hinted_wave, score_groups
from guide_mega.metrics import Metrics
from guide_mega.rollout.engine import RolloutEngine, SamplingParams, bucket_named_tensors
from guide_mega.run_log import NullRunLog, RunLog
from guide_mega.types import RolloutGroup, TrainBatch

if TYPE_CHECKING:
    from guide_mega.data import PromptLoader
    from guide_mega.evaluation.runner import PeriodicEvaluator
    from guide_mega.rewards import RewardPool
    from guide_mega.training.critic import MegatronCritic
    from guide_mega.training.policy import MegatronPolicy

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


def max_sampling_rounds(algorithm: AlgorithmConfig) -> int:
    """Sampling rounds a step may take: Filter-GRPO's bound on oversampling, else one."""
    return algorithm.max_filter_rounds if algorithm.filter_groups else 1


def step_seed(run_seed: int, step_index: int) -> int:
    """The sampling seed of a step: a resumed run samples exactly what the uninterrupted run would have."""
    return run_seed * 1_000_003 + step_index


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


@dataclass(frozen=True, kw_only=True)
class RolloutSide:
    """Rank 0's collaborators: the engine, the verifier pool, the prompts and the tokenizer (and the evaluator)."""

    engine: RolloutEngine
    reward_pool: RewardPool
    loader: PromptLoader
    tokenize: Tokenize
    evaluator: PeriodicEvaluator | None = None


class Trainer:
    """Owns one run: the policy and, for GAE, the critic on every rank; on rank 0 the rollout side and the logs."""

    def __init__(
        self,
        config: Config,
        *,
        policy: MegatronPolicy,
        critic: MegatronCritic | None,
        rollout: RolloutSide | None,
        run_log: RunLog | NullRunLog,
    ) -> None:
        self.config, self.policy, self.critic, self.rollout, self.run_log = config, policy, critic, rollout, run_log
        self.step_index = 0
        self._stop_requested = False

    def step(self) -> dict[str, float]:
        """One RL step in the order of DESIGN.md §2; returns its metrics (identical on every rank)."""
        config, algorithm, guide = self.config, self.config.algorithm, self.config.algorithm.guide
        timer, start, payload = PhaseTimer(), time.perf_counter(), (None, None, {})
        if self.rollout is not None:  # rank 0 samples and scores; the other ranks get the packed batch
            engine, pool, tokenize = self.rollout.engine, self.rollout.reward_pool, self.rollout.tokenize
            seed = step_seed(config.train.seed, self.step_index)
            waves = {
                "sampling": SamplingParams.from_config(config.rollout, seed=seed),
                "group_size": config.rollout.group_size,
            }
            groups, metrics, rounds = [], Metrics(), 0
            while len(groups) < config.train.prompts_per_step and rounds < max_sampling_rounds(algorithm):
                rounds += 1  # Filter-GRPO samples more prompts while dropped groups leave the batch short
                prompts = self.rollout.loader.next_batch(config.train.prompts_per_step - len(groups))
                wave, sampled = first_wave(engine, tokenize, prompts, **waves)
                wave, scored = score_groups(wave, pool, prefix="rollout")
                metrics += sampled + scored
                if guide.enabled:
                    unsolved = find_unsolved_groups(wave, threshold=guide.threshold)
                    plan, guided, sampled = hinted_wave(
                        engine, tokenize, wave, unsolved, template=guide.hint_template, **waves
                    )
                    guided, scored = score_groups(guided, pool, prefix="guided")
                    guided = dict(zip(plan.group_indices, guided, strict=True))
                    merged, dropped = merge_guided_groups(
                        wave, guided, mode=guide.merge, drop_equal_rewards=guide.drop_equal_rewards
                    )
                    metrics += sampled + scored + guide_metrics(wave, unsolved, plan, guided, dropped)
                    wave = merged
                if algorithm.filter_groups:
                    wave, filtered = keep_groups_with_variance(wave)
                    metrics += filtered
                groups += wave
            payload = self._pack(groups, metrics, rounds=rounds)
        batch, advantages_S, metrics = _broadcast_object(payload)
        if batch is None:
            self.run_log.message(f"step {self.step_index + 1}: no group with reward variance; training skipped")
            return {**metrics, "train/skipped_step": 1.0, "time/step_s": time.perf_counter() - start}
        with self._engine_asleep(timer):
            with timer("old_logprobs"):
                old_logprobs_T = self.policy.compute_old_logprobs(batch)
            metrics |= logprob_mismatch(batch, old_logprobs_T)
            if self.critic is None:
                advantages_T = batch.per_token(advantages_S.float())
            else:
                with timer("values"):
                    old_values_T, advantages_T, returns_T, gae_metrics = estimate_gae(self.critic, batch, algorithm)
                metrics |= gae_metrics
            with timer("train"):
                metrics |= self.policy.train(batch, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T)
            if self.critic is not None:
                with timer("critic_train"):
                    metrics |= self.critic.train(batch, returns_T=returns_T, old_values_T=old_values_T)
        with timer("weight_sync"):
            self._sync_weights()
        num_tokens = sum(len(ids) for ids in batch.train_prompt_ids) + batch.num_tokens
        metrics["perf/train_tokens_per_s"] = num_tokens / max(timer.seconds["train"], 1e-9)
        return {**metrics, **timer.metrics(), "train/skipped_step": 0.0, "time/step_s": time.perf_counter() - start}

    def _pack(self, groups: list[RolloutGroup], metrics: Metrics, *, rounds: int) -> tuple:
        """Rank 0: (TrainBatch, group advantages [S], metrics) of the kept groups; (None, None, metrics) if none.
        GAE's advantages come later from the critic, on every rank."""
        wanted = self.config.train.prompts_per_step
        if self.config.algorithm.filter_groups and len(groups) < wanted:
            self.run_log.message(
                f"step {self.step_index + 1}: {len(groups)} of {wanted} groups have reward variance after {rounds} "
                "sampling rounds (algorithm.max_filter_rounds); training on those"
            )
        values = metrics.as_dict()
        generated = values.get("rollout/generated_tokens", 0.0) + values.get("guided/generated_tokens", 0.0)
        values |= {
            "filter/rounds": float(rounds),
            "filter/partial_batch": float(len(groups) < wanted),
            "train/num_groups": float(len(groups)),
            "perf/rollout_tokens_per_s": generated / max(values.get("time/rollout_s", 0.0), 1e-9),
            **self.rollout.loader.metrics,
            **self.rollout.reward_pool.metrics,
        }
        if not groups:
            return None, None, values
        gae = self.config.algorithm.estimator == "gae"
        return build_train_batch(groups), None if gae else sequence_advantages(groups, self.config.algorithm), values

    @contextmanager
    def _engine_asleep(self, timer: PhaseTimer):
        """Colocated mode (train.colocate): the engine frees its GPU memory while the policy trains, and is awake
        again before the weight sync."""
        engine = self.rollout.engine if self.rollout is not None and self.config.train.colocate else None
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
        if self.rollout is None:
            for _ in named_tensors:  # other ranks still join each bucket's collectives
                pass
            return
        for bucket in bucket_named_tensors(named_tensors, bucket_bytes=bucket_bytes):
            self.rollout.engine.update_weights(bucket)

    # -- the run -------------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        configured = self.config.checkpoint.dir
        return Path(configured) if configured else Path(self.config.logging.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Checkpoint policy, optimizer and the loop's state (data position, RNG) at the current step."""
        state = {"loader": self.rollout.loader.state_dict(), "rng": rng_state()} if self.rollout is not None else None
        extra = _broadcast_object(state)
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
        if self.rollout is not None:
            self.rollout.loader.load_state_dict(extra["loader"])
            set_rng_state(extra["rng"])
        self._sync_weights()
        self.run_log.message(f"resumed from {path} at step {self.step_index}")

    def close(self) -> None:
        """Stop the reward workers and release the engine (rank 0)."""
        if self.rollout is not None:
            self.rollout.reward_pool.close()
            self.rollout.engine.close()

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
                if self.rollout is not None and self.rollout.evaluator is not None:
                    is_last = self.step_index == self.config.train.steps
                    metrics.update(self.rollout.evaluator(self.step_index, is_last=is_last))
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


def logprob_mismatch(batch: TrainBatch, old_logprobs_T: torch.Tensor) -> dict[str, float]:
    """How far the trainer's old logprobs are from the engine's, on tokens sampled under the same context.

    This is the engine/trainer numerics gap (it should be ~0), kept apart from Guide's intended off-policy ratio.
    """
    if batch.behaviour_logprobs_T is None:
        return {}
    diff_T = (old_logprobs_T - batch.behaviour_logprobs_T).abs()
    return {
        "rollout/trainer_logprob_abs_diff_mean": float(diff_T.mean()),
        "rollout/trainer_logprob_abs_diff_max": float(diff_T.max()),
    }


def estimate_gae(critic: MegatronCritic, batch: TrainBatch, algorithm: AlgorithmConfig) -> tuple:
    """PPO: value the batch with the critic; returns (old values [T], GAE advantages [T], returns [T], metrics).
    Every rank computes the same values, hence the same advantages."""
    old_values_T = critic.compute_values(batch)
    rewards_T = terminal_rewards_packed(batch.rewards_S, batch.cu_seqlens_S1)
    advantages_T, returns_T = gae_advantages_packed(
        rewards_T, old_values_T, batch.cu_seqlens_S1, gamma=algorithm.gae_gamma, lam=algorithm.gae_lambda
    )
    metrics = {
        "critic/old_value_mean": float(old_values_T.mean()),
        "critic/return_mean": float(returns_T.mean()),
        "critic/advantage_mean": float(advantages_T.mean()),
        "critic/advantage_std": float(advantages_T.std()) if advantages_T.numel() > 1 else 0.0,
    }
    return old_values_T, advantages_T, returns_T, metrics


def build_trainer(config: Config) -> Trainer:
    """Everything a run needs, from its config: on every rank the policy (and critic); on rank 0 the rollout side
    and the run log."""
    from guide_mega.training.policy import MegatronPolicy

    model_dir = _broadcast_object(resolve_model_path(config.model.path) if _rank() == 0 else None)
    policy = MegatronPolicy(**_model_options(config, model_dir), temperature=config.rollout.temperature)
    critic = _build_critic(config, model_dir)
    if _rank() != 0:
        return Trainer(config, policy=policy, critic=critic, rollout=None, run_log=NullRunLog())
    run_log = RunLog(config.logging.run_dir, config, total_steps=config.train.steps)
    return Trainer(config, policy=policy, critic=critic, rollout=_build_rollout_side(config, model_dir, run_log),
                   run_log=run_log)  # fmt: skip


def _build_rollout_side(config: Config, model_dir: Path, run_log: RunLog) -> RolloutSide:
    """Rank 0's engine, reward pool, prompt loader and tokenizer, and the evaluator of train.eval_every."""
    from transformers import AutoTokenizer

    from guide_mega.data import PromptLoader, load_prompt_source, render_prompt_ids
    from guide_mega.rewards import RewardPool

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_set = load_prompt_source(config.data.source, config.data)
    if prompt_set.num_skipped_rows or prompt_set.num_without_hint:
        run_log.message(
            f"data: {len(prompt_set.prompts)} prompts; {prompt_set.num_skipped_rows} malformed rows skipped; "
            f"{prompt_set.num_without_hint} problems without a usable hint"
        )
    loader = PromptLoader.from_config(
        prompt_set.prompts, config.data, tokenizer=tokenizer, hint_template=config.algorithm.guide.hint_template
    )
    tokenize = lambda content: render_prompt_ids(tokenizer, content, system_prompt=config.data.system_prompt)  # noqa: E731
    engine = _build_engine(config, model_dir)
    reward_pool = RewardPool.from_config(config.reward, lenient=config.reward.lenient)
    evaluator = None
    if config.train.eval_every:
        evaluator = _build_evaluator(config, engine, reward_pool, tokenize, prompt_set.prompts, run_log)
    return RolloutSide(engine=engine, reward_pool=reward_pool, loader=loader, tokenize=tokenize, evaluator=evaluator)


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


def _build_evaluator(config: Config, engine, reward_pool, tokenize: Tokenize, training_prompts: list, run_log):
    """The PeriodicEvaluator of train.eval_every on data.eval_source minus any problem also in the training data
    (how many those were is logged)."""
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
    run_log.message(
        f"eval: {len(prompts)} held-out problems from {config.data.eval_source} "
        f"({len(candidates) - len(prompts)} left out: also in the training data)"
    )
    settings = EvalSettings(
        num_samples=config.train.eval_samples,
        sampling=SamplingParams.from_config(config.rollout, seed=config.train.seed),
        max_prompt_tokens=config.data.max_prompt_tokens,
    )
    return PeriodicEvaluator(
        engine=engine, reward_pool=reward_pool, prompts=prompts, tokenize=tokenize, settings=settings,
        every=config.train.eval_every, output_dir=Path(config.logging.run_dir) / "eval",
    )  # fmt: skip
