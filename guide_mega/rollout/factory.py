"""The rollout engine a RolloutConfig asks for."""

from __future__ import annotations

from pathlib import Path

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import RolloutEngine
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_engine import SGLangColocatedEngine, SGLangServerEngine


def create_rollout_engine(model_path: str | Path, config: RolloutConfig, *, device: str = "cpu") -> RolloutEngine:
    """HFEngine for engine='hf'; for 'sglang', a client of `sglang_url` if set, else a colocated sglang.Engine.

    The server client pushes weights through `model_path`'s sibling directory `<model_path>.rollout_weights`
    (the server must see the same filesystem) unless the trainer calls `init_weight_group` first.
    """
    if config.engine == "hf":
        return HFEngine.from_config(model_path, config, device=device)
    if config.sglang_url is not None:
        model_path = Path(model_path)
        return SGLangServerEngine.from_config(
            config, model_dir=model_path, weight_dir=model_path.with_name(f"{model_path.name}.rollout_weights")
        )
    return SGLangColocatedEngine.from_config(model_path, config)
