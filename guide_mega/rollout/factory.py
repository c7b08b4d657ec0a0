"""The rollout engine a RolloutConfig asks for."""

from __future__ import annotations

from pathlib import Path

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import RolloutEngine
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_colocated import SGLangColocatedEngine
from guide_mega.rollout.sglang_engine import SGLangServerEngine


def create_rollout_engine(
    model_path: str | Path, config: RolloutConfig, *, device: str = "cpu", gpu_id: int = 0
) -> RolloutEngine:
    """HFEngine for engine='hf'; for 'sglang', a client of the `sglang_urls` servers (or router) if set, else a
    colocated sglang.Engine on GPUs gpu_id .. gpu_id + rollout.tensor_parallel - 1 of this node.

    The server client spreads requests over the servers and pushes weights to all of them through `model_path`'s
    sibling directory `<model_path>.rollout_weights` (the servers must see the same filesystem), unless the trainer
    builds the weight group first (`init_weight_group`, for rollout.sglang_weight_group).
    """
    if config.engine == "hf":  # one device: rollout.tensor_parallel only says how many ranks share an engine
        return HFEngine.from_config(model_path, config, device=device)
    if config.sglang_urls:
        model_path = Path(model_path)
        return SGLangServerEngine.from_config(
            config, model_dir=model_path, weight_dir=model_path.with_name(f"{model_path.name}.rollout_weights")
        )
    return SGLangColocatedEngine.from_config(model_path, config, tp_size=config.tensor_parallel, base_gpu_id=gpu_id)
