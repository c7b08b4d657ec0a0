"""Everything a run needs, built from its config, once: the policy (and critic) on every rank, the rollout engines
on their owner ranks with the groups that join them, and on rank 0 the prompts, rewards, evaluator and log.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from guide_mega.config import Config
from guide_mega.data.embedded_model import resolve_model_path
from guide_mega.experience import Tokenize
from guide_mega.rollout.engine import SamplingParams
from guide_mega.rollout.fleet import EngineFleet, EngineLayout
from guide_mega.run_log import NullRunLog, RunLog
from guide_mega.trainer import RolloutEngines, RolloutSide, Trainer, broadcast_object


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_trainer(config: Config) -> Trainer:
    """Everything a run needs, from its config: on every rank the policy (and critic) and its part in the rollout
    engines; on rank 0 the rollout side and the run log."""
    from guide_mega.training.data_parallel import world_data_ranks
    from guide_mega.training.distributed import init_parallel
    from guide_mega.training.policy import MegatronPolicy

    parallel = config.parallel
    init_parallel(tensor=parallel.tensor, pipeline=parallel.pipeline, context=parallel.context,
                  seed=config.train.seed, timeout=_timeout(config))  # fmt: skip
    objects = dist.new_group(backend="gloo", timeout=_timeout(config)) if dist.get_world_size() > 1 else None
    model_dir = broadcast_object(resolve_model_path(config.model.path) if _rank() == 0 else None, objects)
    # Engines first: SGLang sizes its KV cache from the memory free when it starts (guide-mega plan assumes this).
    engines = _build_engines(config, model_dir, objects)
    policy = MegatronPolicy(**_model_options(config, model_dir), temperature=config.rollout.temperature)
    critic = _build_critic(config, model_dir)
    parts = {"policy": policy, "critic": critic, "engines": engines}
    parts["data_ranks"] = world_data_ranks(objects) if objects is not None else [0]
    if _rank() != 0:
        return Trainer(config, rollout=None, run_log=NullRunLog(), **parts)
    run_log = RunLog(config.logging.run_dir, config, total_steps=config.train.steps)
    return Trainer(config, rollout=_build_rollout_side(config, model_dir, engines, run_log), run_log=run_log, **parts)


def _timeout(config: Config) -> datetime.timedelta:
    return datetime.timedelta(minutes=config.parallel.timeout_minutes)


def engine_owners(config: Config) -> list[int]:
    """Global ranks that own a rollout engine: one per group of rollout.tensor_parallel ranks on every node when
    colocated; rank 0 alone with separate SGLang servers (its engine is their client)."""
    if config.rollout.sglang_urls or not dist.is_initialized():
        return [0]
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return EngineLayout(world_size, local_world_size, config.rollout.tensor_parallel).owners


def _build_engines(config: Config, model_dir: Path, objects) -> RolloutEngines:
    """This rank's engine if it owns one, and the gloo group of the owners (a collective: every rank calls it)."""
    owners = engine_owners(config)
    group = dist.new_group(owners, backend="gloo", timeout=_timeout(config)) if len(owners) > 1 else None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local = _build_engine(config, model_dir, gpu_id=local_rank) if _rank() in owners else None
    return RolloutEngines(local=local, owners=tuple(owners), group=group, objects=objects)


def _build_rollout_side(config: Config, model_dir: Path, engines: RolloutEngines, run_log: RunLog) -> RolloutSide:
    """Rank 0's engine front, reward pool, prompt loader and tokenizer, and the evaluator of train.eval_every."""
    from transformers import AutoTokenizer

    from guide_mega.data import PromptLoader, load_prompt_source, render_prompt_ids
    from guide_mega.rewards import RewardPool

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_set = load_prompt_source(config.data.source, config.data)
    if losses := prompt_set.losses_line():
        run_log.message(losses)
    loader = PromptLoader.from_config(
        prompt_set.prompts, config.data, tokenizer=tokenizer, hint_template=config.algorithm.guide.hint_template
    )
    tokenize = lambda content: render_prompt_ids(tokenizer, content, system_prompt=config.data.system_prompt)  # noqa: E731
    engine = engines.local
    if engines.group is not None:
        engine = EngineFleet(engines.local, owners=engines.owners, group=engines.group)
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


def _build_engine(config: Config, model_dir: Path, *, gpu_id: int):
    """This owner's rollout engine: HF, a colocated sglang.Engine, or (rank 0) a client of separate SGLang servers,
    which get weights over one group when rollout.sglang_weight_group is set and through a shared directory
    otherwise."""
    from guide_mega.rollout.factory import create_rollout_engine

    engine = create_rollout_engine(model_dir, config.rollout, device=_device(config), gpu_id=gpu_id)
    group = config.rollout.sglang_weight_group
    if config.rollout.engine == "sglang" and config.rollout.sglang_urls and group:
        host, _, port = group.rpartition(":")
        backend = "nccl" if _device(config) == "cuda" else "gloo"
        engine.init_weight_group(
            master_address=host, master_port=int(port), backend=backend, timeout_s=config.parallel.timeout_minutes * 60
        )
    return engine


def _build_evaluator(config: Config, engine, reward_pool, tokenize: Tokenize, training_prompts: list, run_log):
    """The PeriodicEvaluator of train.eval_every on data.eval_source minus any problem also in the training data
    (how many those were is logged)."""
    from guide_mega.data import load_prompt_source
    from guide_mega.evaluation.runner import EvalSettings, PeriodicEvaluator

    eval_data = dataclasses.replace(config.data, source_options=config.data.eval_source_options)
    seen = {repr(prompt.prompt) for prompt in training_prompts}
    candidates = load_prompt_source(config.data.eval_source, eval_data, key="data.eval_source").prompts
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
