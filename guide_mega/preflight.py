"""Checks of a run's inputs that load no model, so that a user's mistake is a one-line error in seconds instead of a
traceback after minutes of model loading (and the same error on every rank under torchrun, before any collective).

`guide-mega train` (and `train --dry-run`) runs `check_run_inputs`; `guide-mega eval` runs the parts it needs.
Every failure is a ValueError whose message starts with the config key at fault.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from guide_mega.config import Config, DataConfig, RewardConfig, RolloutConfig
from guide_mega.data.embedded_model import EMBEDDED_PREFIX, embedded_gguf_path, resolve_model_path
from guide_mega.data.sources import check_prompt_file, is_prompt_file, load_prompt_source
from guide_mega.rewards.custom import is_custom_reward
from guide_mega.rewards.sandbox import require_boundary
from guide_mega.rewards.verifiers import check_reward_name

SUPPORTED_ARCHITECTURES = "Llama-3 (model_type llama), Qwen2 / Qwen2.5 (qwen2) and Qwen3 (qwen3) dense decoders"


def check_prompt_source(source: str, data: DataConfig, *, key: str) -> None:
    """`source` exists and takes its options: a file is only looked for (it may be large); a generator is built
    once (they are small and cheap) so that its own check of the options runs now."""
    if not source:
        raise ValueError(f"{key}: not set; give a .jsonl or .parquet prompt file or a generator (see docs/data.md)")
    if is_prompt_file(source):
        check_prompt_file(source, data.source_options, key=key)
    else:
        load_prompt_source(source, data, key=key)


def check_reward(reward: RewardConfig) -> None:
    """reward.name is a registered verifier or an importable function of the right signature; a function of one's
    own takes none of the built-in verifiers' answer-format options (they would be silently ignored); code rewards
    have an OS sandbox here or are told to run without one (reward.allow_weak_sandbox)."""
    check_reward_name(reward.name)
    if reward.name == "code":
        require_boundary(allow_weak=reward.allow_weak_sandbox)
    if not is_custom_reward(reward.name):
        return
    for key in ("format_gate", "format_bonus", "lenient"):
        if getattr(reward, key):
            raise ValueError(
                f"reward.{key}: applies to the built-in verifiers only; {reward.name} decides its reward itself "
                f"(remove reward.{key})"
            )


def check_rollout_engine(rollout: RolloutConfig) -> None:
    """A colocated SGLang engine needs the sglang package in this environment (a client of servers does not)."""
    if rollout.engine == "sglang" and not rollout.sglang_urls and importlib.util.find_spec("sglang") is None:
        raise ValueError(
            "rollout.engine: 'sglang' runs SGLang in this process and needs the sglang package: install the gpu "
            "extra (pip install 'guide-mega[gpu]', on a CUDA machine), set rollout.sglang_urls to running servers, "
            "or use rollout.engine=hf"
        )


def check_model_dir(model_dir: Path, *, key: str) -> None:
    """`model_dir` is an HF checkpoint of an architecture the Megatron backend builds."""
    from guide_mega.training.architecture import read_architecture

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{key}: {model_dir} is not an HF model directory (no config.json there)")
    try:
        read_architecture(model_dir)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}; supported: {SUPPORTED_ARCHITECTURES}") from None


def check_model_path(path: str, *, key: str = "model.path") -> None:
    """model.path names an embedded model whose package is installed, or a local (or locally cached hub) HF
    directory of a supported architecture. Converts nothing and downloads nothing."""
    if path.startswith(EMBEDDED_PREFIX):
        try:
            embedded_gguf_path(path.removeprefix(EMBEDDED_PREFIX))
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ValueError(f"{key}: {exc}") from None
        return
    check_model_dir(resolve_model_path(path), key=key)


def check_run_inputs(config: Config) -> None:
    """Everything `train` can check before it loads a model: reward, data sources, rollout engine, model."""
    check_reward(config.reward)
    check_prompt_source(config.data.source, config.data, key="data.source")
    if config.data.eval_source:
        eval_data = DataConfig(source_options=config.data.eval_source_options, schema=config.data.schema)
        check_prompt_source(config.data.eval_source, eval_data, key="data.eval_source")
    check_rollout_engine(config.rollout)
    check_model_path(config.model.path)
