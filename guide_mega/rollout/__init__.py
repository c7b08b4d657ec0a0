"""Rollout engines behind one protocol: HFEngine (transformers) and the SGLang engines (sglang_engine.py over
HTTP, sglang_colocated.py in process)."""

from guide_mega.rollout.engine import Completion, RolloutEngine, SamplingParams, bucket_named_tensors
from guide_mega.rollout.factory import create_rollout_engine
from guide_mega.rollout.hf_engine import HFEngine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "SamplingParams", "bucket_named_tensors", "create_rollout_engine"]
