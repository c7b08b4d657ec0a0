"""The colocated SGLang engine: a `RolloutEngine` over an in-process `sglang.Engine` that shares the GPUs with
training. It takes weights as tensors in memory (`update_weights_from_tensor`, one bucket at a time) and releases
its memory while the policy trains. The only module that imports sglang (lazily, when an engine is built); requests
and answers use the formats it shares with the HTTP client (`sglang_protocol.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import WAKE_PARTS, Completion, SamplingParams, bucket_named_tensors
from guide_mega.rollout.sglang_protocol import (
    SGLangServerError,
    completion_from_output,
    request_payloads,
    sglang_memory_tags,
)


def _check_engine_answer(answer: Any, call: str) -> None:
    """sglang.Engine's weight calls answer (success, message); a refusal must not pass silently."""
    if isinstance(answer, tuple) and answer and answer[0] is False:
        raise SGLangServerError(f"sglang.Engine.{call} failed: {answer[1] if len(answer) > 1 else answer}")


class SGLangColocatedEngine:
    """`RolloutEngine` over an in-process `sglang.Engine` sharing the GPUs with training (memory saver on)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        mem_fraction_static: float,
        bucket_bytes: int,
        tp_size: int = 1,
        dtype: str = "bfloat16",
        random_seed: int = 0,
        enable_memory_saver: bool = True,
        **engine_options: Any,
    ) -> None:
        import sglang

        self.bucket_bytes = bucket_bytes
        self._engine = sglang.Engine(
            model_path=str(model_path),
            mem_fraction_static=mem_fraction_static,
            tp_size=tp_size,
            dtype=dtype,
            random_seed=random_seed,
            enable_memory_saver=enable_memory_saver,
            **engine_options,
        )

    @classmethod
    def from_config(cls, model_path: str | Path, config: RolloutConfig, **options: Any) -> SGLangColocatedEngine:
        return cls(
            model_path,
            mem_fraction_static=config.sglang_mem_fraction,
            bucket_bytes=config.weight_bucket_mb << 20,
            **options,
        )

    def generate(
        self, requests: Sequence[Sequence[int]], sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """Completions in request order; with `seeds`, each request carries its own sampling seed."""
        outputs = self._engine.generate(
            input_ids=[list(ids) for ids in requests],
            sampling_params=request_payloads(sampling, seeds),
            return_logprob=True,
        )
        return [completion_from_output(output) for output in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push weights one bucket at a time (bounding the extra memory), flushing the prefix cache once at the end.

        SGLang >= 0.5.20 takes weights only inside a begin/end weight-update session; older engines have neither call.
        """
        has_session = hasattr(self._engine, "begin_weight_update")
        if has_session:
            _check_engine_answer(self._engine.begin_weight_update(), "begin_weight_update")
        for bucket in bucket_named_tensors(named_tensors, bucket_bytes=self.bucket_bytes):
            answer = self._engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
            _check_engine_answer(answer, "update_weights_from_tensor")
        if has_session:
            _check_engine_answer(self._engine.end_weight_update(), "end_weight_update")
        self._engine.flush_cache()

    def sleep(self) -> None:
        self._engine.release_memory_occupation()

    def wake(self, *, parts: Sequence[str] = WAKE_PARTS) -> None:
        self._engine.resume_memory_occupation(tags=sglang_memory_tags(parts))

    def close(self) -> None:
        self._engine.shutdown()
