"""HFEngine: rollouts with transformers `generate` on the CPU or one GPU (the embedded default and the tests).

Batches are left-padded. Sampling is done by our own logits processors (temperature, then top-k, then top-p) so
that a recorder placed first sees the raw logits of every step; a stopping criterion, called after each token is
appended, reads off the sampled token's logprob and detects end-of-sequence and stop strings per sequence. That
gives exact per-token logprobs (see `engine.py` for the convention) and exact finish positions without keeping a
[steps, batch, vocab] tensor of scores.

Shape legend: B sequences in a generate call, P padded prompt length, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.types import FinishReason

logger = logging.getLogger(__name__)

# Extra tokens decoded beyond a stop string's length when looking for it: a token can decode to zero characters
# (a partial UTF-8 byte), so a window of exactly len(stop) tokens could miss a match.
_STOP_WINDOW_MARGIN = 4


class _SamplingTrace:
    """What one generate call sampled: per-step logprobs of the chosen tokens, and where each sequence stopped."""

    def __init__(self, *, batch_size: int, temperature: float, eos_ids: set[int], stop: Sequence[str], tokenizer: Any):
        self.temperature = temperature
        self.eos_ids = eos_ids
        self.stop = tuple(stop)
        self.stop_window = max((len(text) for text in stop), default=0) + _STOP_WINDOW_MARGIN
        self.tokenizer = tokenizer
        self.step_logprobs_BV: torch.Tensor | None = None
        self.token_logprobs: list[torch.Tensor] = []
        self.num_generated = 0
        self.finish_step: list[int | None] = [None] * batch_size
        self.response_ids: list[list[int]] = [[] for _ in range(batch_size)]

    def record_distribution(self, scores_BV: torch.Tensor) -> None:
        self.step_logprobs_BV = torch.log_softmax(scores_BV.float() / self.temperature, dim=-1)

    def _completes_stop(self, row: int) -> bool:
        tail = self.response_ids[row][-self.stop_window :]
        now, before = self.tokenizer.batch_decode([tail, tail[:-1]])
        return any(text in now and text not in before for text in self.stop)

    def record_token(self, token_ids_B: torch.Tensor) -> torch.Tensor:
        """Log the sampled tokens; returns bool [B]: sequences finished now or earlier."""
        step = self.num_generated
        self.token_logprobs.append(self.step_logprobs_BV.gather(1, token_ids_B[:, None]).squeeze(1).cpu())
        self.num_generated += 1
        for row, token in enumerate(token_ids_B.tolist()):
            if self.finish_step[row] is not None:
                continue
            self.response_ids[row].append(token)
            if token in self.eos_ids or (self.stop and self._completes_stop(row)):
                self.finish_step[row] = step
        return torch.tensor([step is not None for step in self.finish_step], device=token_ids_B.device)

    def completion(self, row: int) -> tuple[list[int], list[float], FinishReason]:
        ids = self.response_ids[row]
        logprobs = [float(self.token_logprobs[step][row]) for step in range(len(ids))]
        return ids, logprobs, "stop" if self.finish_step[row] is not None else "length"


class _RecordDistribution(LogitsProcessor):
    def __init__(self, trace: _SamplingTrace) -> None:
        self.trace = trace

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.trace.record_distribution(scores)
        return scores


class _RecordToken(StoppingCriteria):
    def __init__(self, trace: _SamplingTrace) -> None:
        self.trace = trace

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return self.trace.record_token(input_ids[:, -1])


def _sampling_processors(trace: _SamplingTrace, sampling: SamplingParams) -> LogitsProcessorList:
    processors: list[LogitsProcessor] = [_RecordDistribution(trace)]
    if not sampling.is_greedy:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList(processors)


class HFEngine:
    """A `RolloutEngine` over a transformers causal LM, generating `batch_size` sequences per `generate` call."""

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

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        # Neutral built-in warpers when sampling: ours (in _sampling_processors) do it, after the recorder.
        neutral = {} if sampling.is_greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        return GenerationConfig(
            do_sample=not sampling.is_greedy,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=[] if sampling.ignore_eos else sorted(self.eos_ids),
            **neutral,
        )

    def _left_pad(self, requests: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids_BP and attention_mask_BP with each prompt right-aligned."""
        width = max(len(ids) for ids in requests)
        input_ids_BP = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask_BP = torch.zeros((len(requests), width), dtype=torch.long)
        for row, ids in enumerate(requests):
            input_ids_BP[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask_BP[row, width - len(ids) :] = 1
        return input_ids_BP.to(self.device), attention_mask_BP.to(self.device)

    @torch.inference_mode()
    def _generate_batch(self, requests: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        trace = _SamplingTrace(
            batch_size=len(requests),
            temperature=1.0 if sampling.is_greedy else sampling.temperature,
            eos_ids=set() if sampling.ignore_eos else self.eos_ids | set(sampling.stop_token_ids),
            stop=sampling.stop,
            tokenizer=self.tokenizer,
        )
        input_ids_BP, attention_mask_BP = self._left_pad(requests)
        self.model.generate(
            input_ids=input_ids_BP,
            attention_mask=attention_mask_BP,
            generation_config=self._generation_config(sampling),
            logits_processor=_sampling_processors(trace, sampling),
            stopping_criteria=StoppingCriteriaList([_RecordToken(trace)]),
        )
        completions = []
        for row in range(len(requests)):
            ids, logprobs, reason = trace.completion(row)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(Completion(response_ids=ids, logprobs=logprobs, finish_reason=reason, text=text))
        return completions

    def generate(self, requests: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """Completions in request order, generated `batch_size` requests at a time."""
        if self._is_asleep:
            raise RuntimeError("HFEngine.generate called while asleep; call wake() first")
        if any(len(ids) == 0 for ids in requests):
            raise ValueError("HFEngine.generate: every request needs at least one prompt token")
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        completions: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            completions += self._generate_batch(requests[start : start + self.batch_size], sampling)
        return completions

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

    def sleep(self) -> None:
        """Move the weights to host memory (a GPU engine frees its memory; on the CPU nothing changes)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._is_asleep = True

    def wake(self) -> None:
        self.model.to(self.device)
        self._is_asleep = False

    def close(self) -> None:
        self.model = None
        self._is_asleep = True
