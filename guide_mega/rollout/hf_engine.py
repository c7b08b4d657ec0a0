"""HFEngine: rollouts from a transformers causal LM on the CPU or one GPU (the embedded default and the tests).

Sampling runs in `hf_decode.sample_requests` (our own KV-cache loop, not `generate`): `batch_size` decode slots
kept full by continuous batching (a finished sequence's slot goes to the next waiting request), each distinct
prompt prefilled once for all its samples, and every sampled token's logprob kept under `engine.py`'s convention,
with exact finish positions for end-of-sequence tokens and stop strings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import WAKE_PARTS, Completion, SamplingParams, compare_weight_heads, weight_head
from guide_mega.rollout.hf_decode import sample_requests

logger = logging.getLogger(__name__)


class HFEngine:
    """A `RolloutEngine` over a transformers causal LM, decoding up to `batch_size` sequences at a time."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        tokenizer: Any = None,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._is_asleep = False

    @classmethod
    def from_config(cls, model_path: str | Path, config: RolloutConfig, *, device: str = "cpu") -> HFEngine:
        # fp32: on CPUs without AMX, bf16 decoding is ~20% slower (reference/demo_measurements.md).
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return cls(model_path, device=device, dtype=dtype, batch_size=config.batch_size)

    def generate(
        self, requests: Sequence[Sequence[int]], sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """Completions in request order, decoded `batch_size` at a time (a finished sequence's slot goes to the next
        request); with `seeds`, each request from its own random stream (the same tokens whatever the batch size
        and the other requests)."""
        if self._is_asleep:
            raise RuntimeError("HFEngine.generate called while asleep; call wake() first")
        if any(len(ids) == 0 for ids in requests):
            raise ValueError("HFEngine.generate: every request needs at least one prompt token")
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"HFEngine.generate: {len(seeds)} seeds for {len(requests)} requests")
        if sampling.seed is not None and seeds is None:
            torch.manual_seed(sampling.seed)
        return sample_requests(
            self.model,
            requests,
            sampling,
            width=self.batch_size,
            tokenizer=self.tokenizer,
            pad_id=self.pad_id,
            stop_ids=set() if sampling.ignore_eos else self.eos_ids | set(sampling.stop_token_ids),
            seeds=seeds,
        )

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each (hf_name, tensor) into the model's parameter of that name, in place (tied names included)."""
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        num_updated = 0
        for name, tensor in named_tensors:
            if name not in parameters:
                raise KeyError(f"HFEngine.update_weights: {name!r} is not a parameter of the rollout model")
            target = parameters[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"HFEngine.update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            num_updated += 1
        logger.debug("HFEngine: updated %d tensors", num_updated)

    def check_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise WeightSyncError unless the model's first values of these tensors equal the given ones (the
        trainer's, after a push) within the rounding of the two dtypes."""
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors:
            held = parameters[name]
            tolerance = max(torch.finfo(held.dtype).eps, torch.finfo(tensor.dtype).eps)
            compare_weight_heads("HFEngine", name, weight_head(held), weight_head(tensor), tolerance)

    def sleep(self) -> None:
        """Move the weights to host memory (a GPU engine frees its memory; on the CPU nothing changes)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._is_asleep = True

    def wake(self, *, parts: Sequence[str] = WAKE_PARTS) -> None:
        """Bring the weights back with 'weights' (a KV cache exists only during a generate call)."""
        if "weights" in parts:
            self.model.to(self.device)
            self._is_asleep = False

    def close(self) -> None:
        self.model = None
        self._is_asleep = True
