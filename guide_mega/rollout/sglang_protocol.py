"""The wire formats both SGLang engines share (`sglang_engine.py` over HTTP, `sglang_colocated.py` in process):
sampling parameters out, completions back, how requests spread over servers, and the errors a server's answer
turns into.

Requests carry token ids and ask for `return_logprob`: SGLang's default logprob is log softmax(logits / T) of the
sampled token, before top-k/top-p truncation, the convention of `engine.py` (SGLANG_RETURN_ORIGINAL_LOGPROB must
stay unset). Stop strings stay in the text (`no_stop_trim`), as HFEngine keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guide_mega.rollout.engine import Completion, SamplingParams
from guide_mega.rollout.fleet import split_by_expected_tokens


class SGLangServerError(RuntimeError):
    """An SGLang server is unreachable or refused a request; the message names the URL and endpoint."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SGLangServerUnavailable(SGLangServerError, ValueError):
    """The server never took the request: no connection (not started, a wrong URL, killed) or 429/5xx after every
    retry, so another server may take it. A ValueError because the remedy lies outside this program (start or
    restart the server): the CLI reports it in one line with exit status 2, not as a traceback."""


class RetryableServerError(SGLangServerError):
    """A failure that may pass on another try: no connection, or 429/5xx while the server starts or is busy."""


def sglang_memory_tags(parts: Sequence[str]) -> list[str]:
    """SGLang's memory tags for `RolloutEngine.wake` parts: the weights alone, or the KV cache with the CUDA graphs."""
    tags = {"weights": ["weights"], "kv_cache": ["kv_cache", "cuda_graph"]}
    unknown = set(parts) - set(tags)
    if unknown:
        raise ValueError(f"unknown engine memory parts {sorted(unknown)}; known: {sorted(tags)}")
    return [tag for part in parts for tag in tags[part]]


def sampling_payload(sampling: SamplingParams) -> dict[str, Any]:
    """SGLang `sampling_params` for `sampling` (temperature 0 is greedy there too)."""
    payload: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_new_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop),
        "stop_token_ids": list(sampling.stop_token_ids),
        "no_stop_trim": True,
        "skip_special_tokens": True,
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.seed is not None:
        payload["sampling_seed"] = sampling.seed
    return payload


def request_payloads(sampling: SamplingParams, seeds: Sequence[int] | None) -> dict[str, Any] | list[dict[str, Any]]:
    """`sampling_params` of a generate call: one dict for all requests, or with `seeds` one per request, each with
    its own `sampling_seed` (SGLang's /generate takes a list, one per input)."""
    payload = sampling_payload(sampling)
    return payload if seeds is None else [{**payload, "sampling_seed": int(seed)} for seed in seeds]


def completion_from_output(output: dict[str, Any]) -> Completion:
    """A Completion from one SGLang generate output ({text, meta_info: {output_token_logprobs, finish_reason}})."""
    meta = output["meta_info"]
    # Each entry is (logprob, token_id, token_text); the ids come from here so ids and logprobs line up.
    entries = meta["output_token_logprobs"]
    finish = meta.get("finish_reason") or {"type": "abort"}
    reason = finish["type"] if finish["type"] in ("stop", "length") else "abort"
    return Completion(
        response_ids=[int(entry[1]) for entry in entries],
        logprobs=[float(entry[0]) for entry in entries],
        finish_reason=reason,
        text=output.get("text", ""),
        metadata={"sglang_finish": finish},
    )


def spread_over_servers(requests: Sequence[Sequence[int]], max_new_tokens: int, num_servers: int) -> list[list[int]]:
    """Request indices per server (each in increasing order), balanced by expected tokens (prompt + max_new_tokens).

    Consecutive copies of one prompt (a GRPO group) stay on one server, whose prefix cache then prefills the prompt
    once, unless the run alone is larger than a server's even share: then it is cut into pieces of at most that.
    """
    runs, start = [], 0
    for index in range(1, len(requests) + 1):
        if index == len(requests) or list(requests[index]) != list(requests[start]):
            runs.append((start, index))
            start = index
    cost = [len(ids) + max_new_tokens for ids in requests]
    even_share = -(-sum(cost) // num_servers)
    pieces = []
    for start, stop in runs:
        per_piece = max(1, even_share // cost[start])
        pieces += [(first, min(first + per_piece, stop)) for first in range(start, stop, per_piece)]
    shards = split_by_expected_tokens([(stop - first) * cost[first] for first, stop in pieces], num_servers)
    return [[index for piece in shard for index in range(*pieces[piece])] for shard in shards]
