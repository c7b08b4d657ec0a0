"""HFEngine's sampling loop over a transformers causal LM: continuous batching, one prefill per distinct prompt.

Shape legend: W slots (the batch width), A running slots, U distinct prompts prefilled together, P padded prefix
length, L layers, Z = 2 (keys, values), H key/value heads, N prefix tokens, D head dimension, V vocabulary.

RL rollouts ask for G samples of each prompt, and most samples stop long before max_new_tokens. Requests wait in a
queue for one of W decode slots (a `SlotCache`, preallocated); when a sequence finishes, the next waiting request
takes a slot, so every step decodes W rows until the queue runs dry (then the batch shrinks). A request enters
with its prompt's prefix (every token but the last) already cached: each distinct prompt's prefix is prefilled
once, when its first request gets a slot, and copied to every sample of it; its last token is the request's first
decode input, so prefill and decode rows step together. Position ids count real tokens only, so a sequence's
positions, and with per-request seeds its samples, do not depend on its batch-mates.

Per-token logprobs follow `engine.py`'s convention: log_softmax(logits / T) of the sampled token, before top-k /
top-p truncation (T = 1 for greedy decoding), computed as the token's score minus the logsumexp of the scores.
"""

from __future__ import annotations

import inspect
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper

from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.rollout.slot_cache import SlotCache

# Extra tokens decoded beyond a stop string's length when looking for it: a token can decode to zero characters
# (a partial UTF-8 byte), so a window of exactly len(stop) tokens could miss a match.
_STOP_WINDOW_MARGIN = 4
# Spare cache columns beyond the longest history: the slot cache compacts at most once per this many steps (each
# compaction copies the live cache once, as transformers' DynamicCache does every step).
_CACHE_SLACK = 32


def sample_next_tokens(
    logits_AV: torch.Tensor, sampling: SamplingParams, *, generators: Sequence[torch.Generator] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled (or greedy) token ids [A] and their logprobs [A] under the temperature-scaled, untruncated softmax.

    With `generators` (one per row), row a draws its token from generators[a] alone (Gumbel-max over the
    truncated scores), so its sample does not depend on the other rows of the batch; else torch's global RNG.
    """
    temperature = 1.0 if sampling.is_greedy else sampling.temperature
    scores_AV = logits_AV.float() / temperature
    # Only the sampled tokens' logprobs are kept: a logsumexp, not a full [A, V] log_softmax.
    logsumexp_A = torch.logsumexp(scores_AV, dim=-1)
    if sampling.is_greedy:
        token_ids_A = scores_AV.argmax(dim=-1)
    else:
        truncated_AV = scores_AV
        if sampling.top_k > 0:
            truncated_AV = TopKLogitsWarper(sampling.top_k)(None, truncated_AV)
        if sampling.top_p < 1.0:
            truncated_AV = TopPLogitsWarper(sampling.top_p)(None, truncated_AV)
        token_ids_A = _draw(truncated_AV, generators)
    return token_ids_A, scores_AV.gather(1, token_ids_A[:, None]).squeeze(1) - logsumexp_A


def _draw(scores_AV: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.multinomial(torch.softmax(scores_AV, dim=-1), num_samples=1).squeeze(1)
    noise_AV = torch.empty_like(scores_AV)
    for row, generator in enumerate(generators):
        torch.rand(scores_AV.shape[1], generator=generator, out=noise_AV[row])
    # Gumbel noise -log(-log(u)), in place: the same values as the out-of-place expression, one buffer.
    noise_AV.clamp_(min=1e-20, max=1.0 - 1e-7).log_().neg_().log_().neg_()
    return noise_AV.add_(scores_AV).argmax(dim=-1)


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


def _prefill(model, prefixes: list[tuple[int, ...]], *, pad_id: int, cache_argument: str) -> list[torch.Tensor]:
    """Each prefix's keys and values [L, 2, H, N, D], from one left-padded forward over all of them."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prefixes)
    input_ids_UP = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    attention_mask_UP = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, ids in enumerate(prefixes):
        input_ids_UP[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask_UP[row, width - len(ids) :] = 1
    input_ids_UP, attention_mask_UP = input_ids_UP.to(device), attention_mask_UP.to(device)
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids_UP,
        attention_mask=attention_mask_UP,
        position_ids=(attention_mask_UP.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument: cache},
    )
    return [
        torch.stack([torch.stack((layer.keys[row, :, width - len(ids) :], layer.values[row, :, width - len(ids) :]))
                     for layer in cache.layers])
        for row, ids in enumerate(prefixes)
    ]  # fmt: skip


class _PrefixStore:
    """Each distinct prompt's prefix keys and values (all its tokens but the last), prefilled once when its first
    request gets a slot and dropped when its last one does."""

    def __init__(self, model, requests: Sequence[tuple[int, ...]], *, pad_id: int, cache_argument: str) -> None:
        self.model, self.pad_id, self.cache_argument = model, pad_id, cache_argument
        self.waiting = Counter(requests)
        self.kv: dict[tuple[int, ...], torch.Tensor] = {}
        config = model.config
        self.empty_LZHND = torch.empty(
            (config.num_hidden_layers, 2, config.num_key_value_heads, 0, _head_dim(config)),
            dtype=model.dtype,
            device=next(model.parameters()).device,
        )

    def take(self, prompts: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """The prefix keys and values [L, 2, H, N, D] of each prompt, prefilling the new ones in one batch."""
        missing = [ids for ids in dict.fromkeys(prompts) if ids not in self.kv]
        prefilled = [ids for ids in missing if len(ids) > 1]
        self.kv.update((ids, self.empty_LZHND) for ids in missing if len(ids) == 1)
        if prefilled:
            prefixes = [ids[:-1] for ids in prefilled]
            kv = _prefill(self.model, prefixes, pad_id=self.pad_id, cache_argument=self.cache_argument)
            self.kv.update(zip(prefilled, kv, strict=True))
        taken = []
        for ids in prompts:
            taken.append(self.kv[ids])
            self.waiting[ids] -= 1
            if not self.waiting[ids]:
                del self.kv[ids]
        return taken


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _SlotBatch:
    """The running requests, one per slot of a SlotCache (the first A slots), and the queue waiting for a slot.

    Each running slot holds its request, the token it feeds next and that token's position.
    """

    def __init__(self, model, requests: Sequence[tuple[int, ...]], *, width: int, max_new: int, pad_id: int) -> None:
        self.model, self.requests, self.width = model, requests, width
        self.cache_argument = _cache_argument(model)
        self.prefixes = _PrefixStore(model, requests, pad_id=pad_id, cache_argument=self.cache_argument)
        config = model.config
        self.cache = SlotCache(
            layers=config.num_hidden_layers, width=width, heads=config.num_key_value_heads,
            head_dim=_head_dim(config), prefix_tokens=max(len(ids) for ids in requests) - 1, max_new=max_new,
            slack=_CACHE_SLACK, dtype=model.dtype, device=next(model.parameters()).device,
        )  # fmt: skip
        self.queue = deque(range(len(requests)))
        self.request_A: list[int] = []
        self.input_A: list[int] = []
        self.position_A: list[int] = []

    def fill(self) -> None:
        """Give free slots to waiting requests, in request order."""
        entering = [self.queue.popleft() for _ in range(min(self.width - len(self.request_A), len(self.queue)))]
        prefixes = self.prefixes.take([self.requests[request] for request in entering])
        for request, prefix_LZHND in zip(entering, prefixes, strict=True):
            self.cache.admit(len(self.request_A), prefix_LZHND)
            prompt = self.requests[request]
            self.request_A.append(request)
            self.input_A.append(prompt[-1])
            self.position_A.append(len(prompt) - 1)
        self.cache.running = len(self.request_A)

    def forward(self) -> torch.Tensor:
        """One decode step of every running slot: next-token logits [A, V]."""
        device = self.cache.kv_LZWHCD.device
        output = self.model(
            input_ids=torch.tensor(self.input_A, device=device)[:, None],
            position_ids=torch.tensor(self.position_A, device=device)[:, None],
            attention_mask=self.cache.attention_mask(),
            use_cache=True,
            **{self.cache_argument: self.cache},
        )
        self.cache.advance()
        return output.logits[:, -1]

    def continue_with(self, tokens: list[int], finished: list[int]) -> None:
        """Feed each running slot its sampled token; free the `finished` slots (the last running slot moves into
        each, so running slots stay first) and refill them from the queue."""
        self.input_A = tokens
        self.position_A = [position + 1 for position in self.position_A]
        for slot in sorted(finished, reverse=True):
            last = len(self.request_A) - 1
            if slot != last:
                self.cache.move(last, slot)
                for state in (self.request_A, self.input_A, self.position_A):
                    state[slot] = state[last]
            for state in (self.request_A, self.input_A, self.position_A):
                state.pop()
        self.cache.running = len(self.request_A)
        self.fill()


@torch.inference_mode()
def sample_requests(
    model,
    requests: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    width: int,
    tokenizer: Any,
    pad_id: int,
    stop_ids: set[int],
    seeds: Sequence[int] | None = None,
) -> list[Completion]:
    """One completion per request (prompt token ids), decoded `width` at a time with continuous batching;
    `stop_ids` end a sequence. With `seeds`, each request samples from its own generator (see
    `sample_next_tokens`), so its tokens do not depend on `width` or on the other requests."""
    device = next(model.parameters()).device
    generators = None if seeds is None else [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    prompts = [tuple(ids) for ids in requests]
    batch = _SlotBatch(model, prompts, width=min(width, len(prompts)), max_new=sampling.max_new_tokens, pad_id=pad_id)
    responses = [_Response(stop_ids=stop_ids, stop=sampling.stop, tokenizer=tokenizer) for _ in prompts]
    batch.fill()
    while batch.request_A:
        logits_AV = batch.forward()
        rows = None if generators is None else [generators[request] for request in batch.request_A]
        token_ids_A, logprobs_A = sample_next_tokens(logits_AV, sampling, generators=rows)
        tokens, finished = token_ids_A.tolist(), []
        for slot, (request, logprob) in enumerate(zip(batch.request_A, logprobs_A.tolist(), strict=True)):
            response = responses[request]
            response.append(tokens[slot], logprob)
            if response.stopped or len(response.ids) == sampling.max_new_tokens:
                finished.append(slot)
        batch.continue_with(tokens, finished)
    return [_completion(response, tokenizer) for response in responses]


def _completion(response: _Response, tokenizer: Any) -> Completion:
    return Completion(
        response_ids=response.ids,
        logprobs=response.logprobs,
        finish_reason="stop" if response.stopped else "length",
        text=tokenizer.decode(response.ids, skip_special_tokens=True),
    )
