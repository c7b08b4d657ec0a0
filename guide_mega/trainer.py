"""The RL loop (DESIGN.md §2): rollouts, rewards, Guide's second wave, advantages, train step, weight sync.

Every rank runs this SPMD under torchrun. Rank 0 runs the loop's rollout half: its engine front spreads the
requests over every rollout engine (one per group of rollout.tensor_parallel GPUs, whose owners serve meanwhile),
and it holds the reward pool, the prompts and the logs. It builds the step's TrainBatch and sends it to every
rank; every rank trains its model shard, and the exported weights (a collective) reach each owner's engine.
Building a run from its config is `guide_mega.build`.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from guide_mega.algorithms.filtering import keep_groups_with_variance
from guide_mega.algorithms.guide import (
    find_unsolved_groups,
    guide_metrics,
    hint_level_updates,
    merge_guided_groups,
    trainable_group_yield,
)
from guide_mega.config import AlgorithmConfig, Config
from guide_mega.data.batch import build_train_batch, sequence_advantages
from guide_mega.experience import Tokenize, first_wave, guided_waves, score_groups, self_written_hints
from guide_mega.metrics import Metrics
from guide_mega.rollout.engine import (
    CHECKED_WEIGHTS,
    RolloutEngine,
    SamplingParams,
    bucket_named_tensors,
    weight_head,
)
from guide_mega.rollout.fleet import serve
from guide_mega.run_log import NullRunLog, RunLog
from guide_mega.training.critic import estimate_gae
from guide_mega.training.data_parallel import pack_share, plan_shares, scatter_shares, select_sequences
from guide_mega.training.policy import logprob_mismatch
from guide_mega.types import RolloutGroup

if TYPE_CHECKING:
    from guide_mega.data import PromptLoader
    from guide_mega.evaluation.runner import PeriodicEvaluator
    from guide_mega.rewards import RewardPool
    from guide_mega.training.critic import MegatronCritic
    from guide_mega.training.policy import MegatronPolicy

# The critic's checkpoints sit beside the policy's, under <checkpoint root>/critic/step_<n>.
CRITIC_DIR = "critic"


def broadcast_object(value: object, group: Any = None) -> object:
    """`value` from rank 0 on every rank of `group` (a gloo group: pickles stay off the GPUs); a no-op in a world of
    one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


class PhaseTimer:
    """Wall time per phase of a step (rollout, reward, old logprobs, train, weight sync)."""

    def __init__(self, on_enter: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter
        """Told the name of each phase as it starts (the progress bar shows it)."""

    @contextmanager
    def __call__(self, phase: str):
        if self.on_enter is not None:
            self.on_enter(phase)
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
class RolloutEngines:
    """This rank's part in rollouts: its own engine if it owns one (each owner syncs, sleeps and wakes its own), the
    global ranks that own one, the gloo group over which rank 0 reaches them (None with one owner), and a gloo group
    of every rank for object broadcasts (None in a world of one)."""

    local: RolloutEngine | None = None
    owners: tuple[int, ...] = (0,)
    group: Any = None
    objects: Any = None


@dataclass(frozen=True, kw_only=True)
class RolloutSide:
    """Rank 0's collaborators: the engine front (all engines), the verifier pool, the prompts and the tokenizer
    (and the evaluator)."""

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
        engines: RolloutEngines,
        run_log: RunLog | NullRunLog,
        data_ranks: list[int] | None = None,
    ) -> None:
        self.config, self.policy, self.critic, self.rollout, self.run_log = config, policy, critic, rollout, run_log
        self.engines = engines
        self.data_ranks = data_ranks or [0]
        """Every global rank's data-parallel rank: rank 0 sends each its share of a step."""
        self.step_index = 0
        self._stop_requested = False

    def step(self) -> dict[str, float]:
        """One RL step in the order of DESIGN.md §2; returns its metrics (identical on every rank)."""
        algorithm = self.config.algorithm
        timer, start, payload = PhaseTimer(self.run_log.phase), time.perf_counter(), (None, None, {})
        if self.rollout is not None:  # rank 0 samples and scores; the other ranks get the packed batch
            groups, metrics, rounds = self._sample_groups()
            payload = self._pack(groups, metrics, rounds=rounds)
        self._engines_done_sampling()
        batch, advantages_S, metrics = self._share(payload)
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
                    old_values_T, advantages_T, returns_T, gae_metrics = estimate_gae(
                        self.critic, batch, gamma=algorithm.gae_gamma, lam=algorithm.gae_lambda
                    )
                metrics |= gae_metrics
            with timer("train"):
                metrics |= self.policy.train(batch, old_logprobs_T=old_logprobs_T, advantages_T=advantages_T)
            if self.critic is not None:
                with timer("critic_train"):
                    metrics |= self.critic.train(batch, returns_T=returns_T, old_values_T=old_values_T)
        with timer("weight_sync"):
            self._sync_weights()
        if self.engines.local is not None and self.config.train.colocate:
            with timer("engine_wake"):
                self.engines.local.wake(parts=("kv_cache",))
        metrics["perf/train_tokens_per_s"] = metrics["train/num_tokens"] / max(timer.seconds["train"], 1e-9)
        return {**metrics, **timer.metrics(), "train/skipped_step": 0.0, "time/step_s": time.perf_counter() - start}

    def _sample_groups(self) -> tuple[list[RolloutGroup], Metrics, int]:
        """Rank 0: the step's trainable groups, their metrics and the number of sampling rounds. Each round is the
        first wave, its scores, Guide's hinted waves and Filter-GRPO; Filter-GRPO samples more prompts while
        dropped groups leave the step short. Every sampled group of both waves goes to samples.jsonl."""
        config = self.config
        waves = {
            "sampling": SamplingParams.from_config(config.rollout, seed=step_seed(config.train.seed, self.step_index)),
            "group_size": config.rollout.group_size,
        }
        groups, metrics, rounds, sampled_groups = [], Metrics(), 0, []
        while len(groups) < config.train.prompts_per_step and rounds < max_sampling_rounds(config.algorithm):
            rounds += 1
            prompts = self.rollout.loader.next_batch(config.train.prompts_per_step - len(groups))
            self.run_log.phase("rollout")
            wave, sampled = first_wave(self.rollout.engine, self.rollout.tokenize, prompts, **waves)
            wave, scored = score_groups(wave, self.rollout.reward_pool, prefix="rollout")
            metrics += sampled + scored
            sampled_groups += wave
            if config.algorithm.guide.enabled:
                self.run_log.phase("guide wave")
                wave, guided_metrics, guided_groups = self._guide(wave, waves)
                metrics += guided_metrics
                sampled_groups += guided_groups
            if config.algorithm.filter_groups:
                wave, filtered = keep_groups_with_variance(wave)
                metrics += filtered
            groups += wave
        self.run_log.samples(self.step_index + 1, sampled_groups)
        return groups, metrics, rounds

    def _guide(self, wave: list[RolloutGroup], waves: dict) -> tuple[list[RolloutGroup], Metrics, list]:
        """Rank 0, Guide on one first wave: (the wave with its unsolved groups merged with their hinted samples,
        the metrics, the hinted groups as sampled). Self-written hints and graded levels live in the loader."""
        guide, loader = self.config.algorithm.guide, self.rollout.loader
        engine, tokenize, metrics = self.rollout.engine, self.rollout.tokenize, Metrics()
        unsolved = find_unsolved_groups(wave, threshold=guide.threshold)
        if guide.hint_source == "self":  # the policy writes the hints the data lacks
            wave, written, metrics = self_written_hints(
                engine, tokenize, wave, unsolved, loader.self_hints,
                sampling=waves["sampling"], max_new_tokens=guide.self_hint_max_tokens,
            )  # fmt: skip
            loader.update_self_hints(written)
        levels = dict(loader.hint_levels) if guide.levels.adaptive else None
        plan, guided, sampled = guided_waves(
            engine, tokenize, self.rollout.reward_pool, wave, unsolved, template=guide.hint_template, levels=levels,
            max_extra_waves=guide.levels.max_extra_waves, **waves,
        )  # fmt: skip
        merged, dropped = merge_guided_groups(
            wave, guided, mode=guide.merge, drop_equal_rewards=guide.drop_equal_rewards
        )
        metrics += sampled + guide_metrics(wave, unsolved, plan, guided, dropped)
        if levels is not None:  # graded hints: each problem's next start level
            loader.update_hint_levels(
                hint_level_updates(
                    wave,
                    unsolved,
                    plan,
                    guided,
                    levels=levels,
                    target=guide.levels.target_success,
                    tolerance=guide.levels.tolerance,
                )  # fmt: skip
            )
        return merged, metrics, list(guided.values())

    def _share(self, payload: tuple) -> tuple:
        """This rank's share of the step as (TrainBatch, group advantages [S] or None) and the step's metrics so
        far: rank 0 plans every data-parallel rank's share and sends each as tensors (`data_parallel`); in a world
        of one the whole batch. (None, None, metrics) when there is nothing to train."""
        if self.engines.objects is None:
            return payload
        batch, advantages_S, metrics = payload
        metrics = broadcast_object(metrics, self.engines.objects)
        if not metrics["train/num_groups"]:
            return None, None, metrics
        packed = None
        if self.rollout is not None:
            shares = plan_shares(
                batch, num_mini_batches=self.config.train.mini_batches_per_step, data_parallel=self.policy.layout.data
            )
            by_data_rank = [
                pack_share(select_sequences(batch, seqs, labels), None if advantages_S is None else advantages_S[seqs])
                for seqs, labels in shares
            ]
            packed = [by_data_rank[data_rank] for data_rank in self.data_ranks]
        return (*scatter_shares(packed, group=self.engines.objects), metrics)

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
        generated = sum(values.get(f"{wave}/generated_tokens", 0.0) for wave in ("rollout", "guided", "self_hint"))
        values |= {
            # An engine front over several engines (the fleet, a client of several servers) says how many.
            "rollout/num_engines": float(getattr(self.rollout.engine, "num_engines", 1)),
            "filter/rounds": float(rounds),
            "filter/partial_batch": float(len(groups) < wanted),
            "train/num_groups": float(len(groups)),
            "perf/rollout_tokens_per_s": generated / max(values.get("time/rollout_s", 0.0), 1e-9),
            **trainable_group_yield(groups, generated_tokens=generated),
            **self.rollout.loader.metrics,
            **self.rollout.reward_pool.metrics,
        }
        if not groups:
            return None, None, values
        rollouts = [rollout for group in groups for rollout in group.rollouts]
        values["train/num_tokens"] = float(sum(len(r.train_prompt_ids) + len(r.response_ids) for r in rollouts))
        gae = self.config.algorithm.estimator == "gae"
        return build_train_batch(groups), None if gae else sequence_advantages(groups, self.config.algorithm), values

    def _engines_done_sampling(self) -> None:
        """Rank 0 has finished sampling for now: it releases the other owners, which served its requests until then."""
        if self.engines.group is None:
            return
        if self.rollout is not None:
            self.rollout.engine.stop_serving()
        elif self.engines.local is not None:
            serve(self.engines.local, group=self.engines.group)

    @contextmanager
    def _engine_asleep(self, timer: PhaseTimer):
        """Colocated mode (train.colocate): every engine frees its GPU memory while the policy trains. On the way
        out only its weights come back, so the sync writes into them before the KV cache takes its memory again
        (`_sync_weights`)."""
        engine = self.engines.local if self.config.train.colocate else None
        if engine is not None:
            with timer("engine_sleep"):
                engine.sleep()
        try:
            yield
        finally:
            if engine is not None:
                with timer("engine_wake"):
                    # Training's freed activations and logits still sit in torch's caching allocator, where the
                    # engine (its own allocator) cannot reach them: hand them back to the device first.
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    engine.wake(parts=("weights",))

    def _sync_weights(self) -> None:
        """Push the updated weights to every engine in buckets: every rank takes part in the export, and each owner
        loads the exported tensors into its own engine."""
        bucket_bytes = self.config.rollout.weight_bucket_mb << 20
        named_tensors = self.policy.export_hf_weights(bucket_bytes=bucket_bytes)
        if self.engines.local is None:
            for _ in named_tensors:  # ranks without an engine still join each bucket's collectives
                pass
            return
        checked = []
        for bucket in bucket_named_tensors(named_tensors, bucket_bytes=bucket_bytes):
            self.engines.local.update_weights(bucket)
            if self.config.rollout.check_weight_sync:
                checked += [(name, weight_head(tensor)) for name, tensor in bucket if CHECKED_WEIGHTS.search(name)]
        if checked:
            self.engines.local.check_weights(checked)

    # -- the run -------------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        configured = self.config.checkpoint.dir
        return Path(configured) if configured else Path(self.config.logging.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Checkpoint policy, optimizer and the loop's state (data position, RNG) at the current step."""
        self.run_log.phase("checkpoint")
        state = {"loader": self.rollout.loader.state_dict(), "rng": rng_state()} if self.rollout is not None else None
        extra = broadcast_object(state, self.engines.objects)
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
        """Stop the reward workers (rank 0) and release this rank's engine."""
        if self.rollout is not None:
            self.rollout.reward_pool.close()
        if self.engines.local is not None:
            self.engines.local.close()

    def _on_sigterm(self, signum, frame) -> None:
        # Slurm sends SIGTERM before preemption or the time limit: finish the step, save, stop.
        self._stop_requested = True

    def stop_file(self) -> Path:
        """The file whose appearance asks the run to checkpoint after the current step and exit (train.stop_file)."""
        configured = self.config.train.stop_file
        return Path(configured) if configured else Path(self.config.logging.run_dir) / "STOP"

    def _stop_reason(self) -> str | None:
        """Why the run should stop after this step (the same answer on every rank): SIGTERM, a stop file, or None."""
        reason = None
        if self._stop_requested:
            reason = "SIGTERM"
        elif self.rollout is not None and self.stop_file().exists():
            reason = f"stop file {self.stop_file()}"
        return broadcast_object(reason, self.engines.objects)

    def fit(self) -> None:
        """Run until train.steps, checkpointing every checkpoint.every steps, at the end, and before stopping early
        on SIGTERM or when the stop file appears (which is then removed, so a requeued job runs on)."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        every = self.config.checkpoint.every
        saved_at = self.step_index
        try:
            while self.step_index < self.config.train.steps:
                metrics = self.step()
                self.step_index += 1
                if self.rollout is not None and self.rollout.evaluator is not None:
                    self.run_log.phase("eval")
                    is_last = self.step_index == self.config.train.steps
                    metrics.update(self.rollout.evaluator(self.step_index, is_last=is_last))
                if self.config.train.eval_every:
                    self._engines_done_sampling()
                self.run_log.log(self.step_index, metrics)
                stop = self._stop_reason()
                if stop or (every and self.step_index % every == 0):
                    self.save()
                    saved_at = self.step_index
                if stop:
                    if self.rollout is not None:
                        self.stop_file().unlink(missing_ok=True)
                    self.run_log.message(f"{stop}: checkpoint written, stopping")
                    return
            if saved_at != self.step_index:
                self.save()
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_training(config: Config) -> Trainer:
    """Build the run, resume per checkpoint.resume (from the newest checkpoint that verifies), train to train.steps,
    and release engine and workers."""
    from guide_mega.build import build_trainer

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
