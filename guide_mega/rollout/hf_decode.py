"""HFEngine's sampling loop over a transformers causal LM: shared-prompt prefill and early exit of finished rows.

Shape legend: U distinct prompts in a call, B sequences of the call, A sequences still running, P padded prompt
length, K cached positions, V vocabulary.

RL rollouts ask for G samples of each prompt and most samples stop long before max_new_tokens. transformers
`generate` prefills every copy of a prompt and keeps decoding a row after it ends until the longest one does. Here
each distinct prompt is prefilled once and its KV-cache row copied to its samples, and a finished sequence leaves
the batch (its cache rows are dropped), so a step costs what the running sequences need. Prompts are left-padded;
position ids count real tokens only, so a sequence's positions do not depend on its batch-mates.

Per-token logprobs follow `engine.py`'s convention: log_softmax(logits / T) of the sampled token, before top-k /
top-p truncation (T = 1 for greedy decoding).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper

from guide_mega.rollout.engine import Completion, SamplingParams

# Extra tokens decoded beyond a stop string's length when looking for it: a token can decode to zero characters
# (a partial UTF-8 byte), so a window of exactly len(stop) tokens could miss a match.
_STOP_WINDOW_MARGIN = 4


def sample_next_tokens(
    logits_AV: torch.Tensor, sampling: SamplingParams, *, generators: Sequence[torch.Generator] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled (or greedy) token ids [A] and their logprobs [A] under the temperature-scaled, untruncated softmax.

    With `generators` (one per row), row a draws its token from generators[a] alone (Gumbel-max over the
    truncated scores), so its sample does not depend on the other rows of the batch; else torch's global RNG.
    """
    temperature = 1.0 if sampling.is_greedy else sampling.temperature
    scores_AV = logits_AV.float() / temperature
    logprobs_AV = torch.log_softmax(scores_AV, dim=-1)
    if sampling.is_greedy:
        token_ids_A = scores_AV.argmax(dim=-1)
    else:
        if sampling.top_k > 0:
            scores_AV = TopKLogitsWarper(sampling.top_k)(None, scores_AV)
        if sampling.top_p < 1.0:
            scores_AV = TopPLogitsWarper(sampling.top_p)(None, scores_AV)
        token_ids_A = _draw(scores_AV, generators)
    return token_ids_A, logprobs_AV.gather(1, token_ids_A[:, None]).squeeze(1)


def _draw(scores_AV: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.multinomial(torch.softmax(scores_AV, dim=-1), num_samples=1).squeeze(1)
    vocab = scores_AV.shape[1]
    uniform_AV = torch.stack([torch.rand(vocab, generator=g, device=scores_AV.device) for g in generators])
    gumbel_AV = -torch.log(-torch.log(uniform_AV.clamp(min=1e-20, max=1.0 - 1e-7)))
    return (scores_AV + gumbel_AV).argmax(dim=-1)


class _Response:
    """One sequence's sampled tokens and logprobs, and whether an end-of-sequence token or stop string ended it."""

    def __init__(self, *, stop_ids: set[int], stop: Sequence[str], tokenizer: Any) -> None:
        self.stop_ids, self.stop, self.tokenizer = stop_ids, stop, tokenizer
        self.stop_window = max((len(text) for text in stop), default=0) + _STOP_WINDOW_MARGIN
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.stopped = False

    def append(self, token: int, logprob: float) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.stopped = token in self.stop_ids or (bool(self.stop) and self._completes_stop())

    def _completes_stop(self) -> bool:
        tail = self.ids[-self.stop_window :]
        now, before = self.tokenizer.batch_decode([tail, tail[:-1]])
        return any(text in now and text not in before for text in self.stop)


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model, prompts: list[tuple[int, ...]], *, pad_id: int, device: torch.device, cache_argument: str):
    """Prefill the distinct prompts once: (cache, attention_mask_UP, next position [U], last logits [U, V])."""
    width = max(len(ids) for ids in prompts)
    input_ids_UP = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask_UP = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids_UP[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask_UP[row, width - len(ids) :] = 1
    input_ids_UP, attention_mask_UP = input_ids_UP.to(device), attention_mask_UP.to(device)
    position_ids_UP = (attention_mask_UP.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=input_ids_UP,
        attention_mask=attention_mask_UP,
        position_ids=position_ids_UP,
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument: cache},
    )
    next_position_U = attention_mask_UP.sum(-1)
    return cache, attention_mask_UP, next_position_U, output.logits[:, -1]


@torch.inference_mode()
def sample_batch(
    model,
    requests: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    tokenizer: Any,
    pad_id: int,
    stop_ids: set[int],
    seeds: Sequence[int] | None = None,
) -> list[Completion]:
    """One completion per request (prompt token ids), all decoded together; `stop_ids` end a sequence. With
    `seeds`, each request samples from its own generator (see `sample_next_tokens`)."""
    device = next(model.parameters()).device
    generators = None if seeds is None else [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    distinct = list(dict.fromkeys(tuple(ids) for ids in requests))
    prompt_row = {ids: row for row, ids in enumerate(distinct)}
    rows_B = torch.tensor([prompt_row[tuple(ids)] for ids in requests], device=device)
    cache_argument = _cache_argument(model)
    cache, attention_mask_UK, next_position_U, logits_UV = _prefill(
        model, distinct, pad_id=pad_id, device=device, cache_argument=cache_argument
    )
    cache.batch_select_indices(rows_B)
    attention_mask_AK, position_A, logits_AV = attention_mask_UK[rows_B], next_position_U[rows_B], logits_UV[rows_B]
    responses = [_Response(stop_ids=stop_ids, stop=sampling.stop, tokenizer=tokenizer) for _ in requests]
    running = list(range(len(requests)))
    for step in range(sampling.max_new_tokens):
        rows = None if generators is None else [generators[seq] for seq in running]
        token_ids_A, logprobs_A = sample_next_tokens(logits_AV, sampling, generators=rows)
        tokens, logprobs, keep = token_ids_A.tolist(), logprobs_A.tolist(), []
        for slot, seq in enumerate(running):
            responses[seq].append(tokens[slot], logprobs[slot])
            if not responses[seq].stopped:
                keep.append(slot)
        if not keep or step == sampling.max_new_tokens - 1:
            break
        if len(keep) < len(running):
            keep_A = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep_A)
            attention_mask_AK, position_A = attention_mask_AK[keep_A], position_A[keep_A]
            token_ids_A = token_ids_A[keep_A]
            running = [running[slot] for slot in keep]
        attention_mask_AK = torch.cat([attention_mask_AK, attention_mask_AK.new_ones(len(running), 1)], dim=1)
        output = model(
            input_ids=token_ids_A[:, None],
            attention_mask=attention_mask_AK,
            position_ids=position_A[:, None],
            use_cache=True,
            **{cache_argument: cache},
        )
        logits_AV, position_A = output.logits[:, -1], position_A + 1
    return [_completion(response, tokenizer) for response in responses]


def _completion(response: _Response, tokenizer: Any) -> Completion:
    return Completion(
        response_ids=response.ids,
        logprobs=response.logprobs,
        finish_reason="stop" if response.stopped else "length",
        text=tokenizer.decode(response.ids, skip_special_tokens=True),
    )
