"""SGLang rollout engines: a client of a running SGLang server (HTTP), and an in-process colocated `sglang.Engine`.

This is the only module that imports sglang (lazily, in the colocated engine). Both engines send token ids and get
token ids back, with `return_logprob`: SGLang's default logprob is log softmax(logits / T) of the sampled token,
before top-k/top-p truncation, which is the convention of `engine.py` (SGLANG_RETURN_ORIGINAL_LOGPROB must stay
unset). Stop strings are kept in the text (`no_stop_trim`), as HFEngine keeps them.

Weights: the server client pushes them with `update_weights_from_disk` (safetensors written to a directory the
server can read) or `update_weights_from_distributed` (a torch.distributed broadcast from this process, rank 0 of a
group the server joins: NCCL on GPUs, gloo on CPUs). The colocated engine passes tensors in memory with
`update_weights_from_tensor`, one bucket at a time, and releases its memory while the policy trains.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import Completion, SamplingParams, bucket_named_tensors

logger = logging.getLogger(__name__)

# HTTP statuses worth retrying: the server is starting, overloaded or restarting; anything else is our error.
_RETRY_STATUSES = (429, 502, 503, 504)
# Files a model directory needs besides its weights, copied next to pushed weights for update_weights_from_disk.
_MODEL_METADATA_GLOBS = ("config.json", "generation_config.json")
# How long the weight-broadcast group waits for the server to join, and for each broadcast.
_WEIGHT_GROUP_TIMEOUT_S = 300


class SGLangServerError(RuntimeError):
    """The SGLang server is unreachable or refused a request; the message names the URL and endpoint."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(SGLangServerError):
    """A failure that may pass on another try: no connection, or 429/5xx while the server starts or is busy."""


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


class SGLangServerEngine:
    """`RolloutEngine` client of an SGLang server at `url`; requests go out in concurrent chunks.

    Every call retries connection failures and 429/5xx answers `max_retries` times with exponential backoff, then
    raises SGLangServerError naming the server; other HTTP errors and timeouts raise at once.
    """

    def __init__(
        self,
        url: str,
        *,
        requests_per_call: int = 16,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        weight_dir: str | Path | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.requests_per_call = requests_per_call
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.weight_dir = Path(weight_dir) if weight_dir is not None else None
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang-http")
        self._weight_group: Any = None
        self._weight_group_name = ""

    @classmethod
    def from_config(cls, config: RolloutConfig, **options: Any) -> SGLangServerEngine:
        if config.sglang_url is None:
            raise ValueError("rollout.sglang_url: needed for the SGLang server client")
        return cls(config.sglang_url, **options)

    def _attempt(self, request: urllib.request.Request, endpoint: str, timeout_s: float) -> Any:
        """One HTTP exchange; raises _Retryable for failures worth another try, SGLangServerError for the rest."""
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
            return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            message = (
                f"SGLang server {self.url}{endpoint}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"
            )
            if exc.code in _RETRY_STATUSES:
                raise _Retryable(message, status=exc.code) from None
            raise SGLangServerError(message, status=exc.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                # Not resent: the server may still be working on it, and a second copy would double its load.
                raise SGLangServerError(
                    f"SGLang server {self.url}{endpoint}: no answer within {timeout_s:g} s"
                ) from None
            raise _Retryable(
                f"SGLang server {self.url} is not reachable ({endpoint}): {reason}; is it running?"
            ) from None

    def _call(self, endpoint: str, payload: dict | None = None, *, timeout_s: float | None = None) -> Any:
        """POST `payload` (GET when None) to `endpoint`; the decoded JSON answer (None for an empty body)."""
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"{self.url}{endpoint}", data=data, headers={"Content-Type": "application/json"}
        )
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(request, endpoint, timeout_s or self.timeout_s)
            except _Retryable as exc:
                if attempt == self.max_retries:
                    raise SGLangServerError(f"{exc} ({attempt + 1} attempts)", status=exc.status) from None
                delay_s = self.retry_backoff_s * 2**attempt
                logger.warning("%s; retry in %.1f s", exc, delay_s)
                time.sleep(delay_s)

    def check_health(self, *, timeout_s: float = 10.0) -> None:
        """Raise SGLangServerError unless the server answers /health."""
        self._call("/health", timeout_s=timeout_s)

    def _generate_chunk(self, requests: Sequence[Sequence[int]], sampling: dict[str, Any]) -> list[Completion]:
        outputs = self._call(
            "/generate",
            {"input_ids": [list(ids) for ids in requests], "sampling_params": sampling, "return_logprob": True},
        )
        if len(outputs) != len(requests):
            raise SGLangServerError(f"SGLang server {self.url}: {len(outputs)} outputs for {len(requests)} requests")
        return [completion_from_output(output) for output in outputs]

    def generate(self, requests: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """Completions in request order; chunks of `requests_per_call` run concurrently on the server."""
        payload = sampling_payload(sampling)
        chunks = [
            requests[start : start + self.requests_per_call]
            for start in range(0, len(requests), self.requests_per_call)
        ]
        futures = [self._executor.submit(self._generate_chunk, chunk, payload) for chunk in chunks]
        return [completion for future in futures for completion in future.result()]

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """Make the server load the HF checkpoint at `model_path` (a path the server can read)."""
        answer = self._call("/update_weights_from_disk", {"model_path": str(model_path), "flush_cache": True})
        if not answer.get("success", False):
            raise SGLangServerError(f"SGLang server {self.url}: update_weights_from_disk failed: {answer}")

    def _write_checkpoint(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
        from safetensors.torch import save_file

        if self.weight_dir is None or self.model_dir is None:
            raise ValueError("SGLangServerEngine: disk weight updates need weight_dir and model_dir")
        self.weight_dir.mkdir(parents=True, exist_ok=True)
        for pattern in _MODEL_METADATA_GLOBS:
            for source in self.model_dir.glob(pattern):
                shutil.copy2(source, self.weight_dir / source.name)
        tensors, storages = {}, set()
        for name, tensor in named_tensors:
            tensor = tensor.detach().contiguous().cpu()
            # Tied weights (embedding and LM head) share storage, which safetensors refuses to write twice.
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        save_file(tensors, self.weight_dir / "model.safetensors.tmp")
        (self.weight_dir / "model.safetensors.tmp").replace(self.weight_dir / "model.safetensors")
        return self.weight_dir

    def init_weight_group(
        self, *, master_address: str, master_port: int, backend: str, group_name: str = "guide_mega_weights"
    ) -> None:
        """Create the broadcast group for `update_weights` over torch.distributed: this process is rank 0 and the
        server's single worker rank 1 (a tensor-parallel server would take ranks 1..tp)."""
        request = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": group_name,
            "backend": backend,
        }
        answer_future = self._executor.submit(self._call, "/init_weights_update_group", request)
        self._weight_group = _new_weight_group(
            backend=backend, init_method=f"tcp://{master_address}:{master_port}", world_size=2, group_name=group_name
        )
        answer = answer_future.result()
        if not answer.get("success", False):
            raise SGLangServerError(f"SGLang server {self.url}: init_weights_update_group failed: {answer}")
        self._weight_group_name = group_name

    def _broadcast_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = [(name, tensor.detach().contiguous().cpu()) for name, tensor in named_tensors]
        request = {
            "names": [name for name, _ in tensors],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in tensors],
            "shapes": [list(tensor.shape) for _, tensor in tensors],
            "group_name": self._weight_group_name,
            "flush_cache": True,
        }
        self._weight_update_session("/begin_weight_update", {})
        answer_future = self._executor.submit(self._call, "/update_weights_from_distributed", request)
        # The group's own (asynchronous) broadcasts: a default process group of the trainer does not hold the
        # server. If the server refuses the update it never receives them, so its answer is watched meanwhile.
        works = [self._weight_group.broadcast(tensor, 0) for _, tensor in tensors]
        while not all(work.is_completed() for work in works):
            if answer_future.done() and answer_future.exception() is not None:
                self._weight_group = None  # a half-finished broadcast leaves the group unusable
                raise answer_future.exception()
            time.sleep(0.01)
        answer = answer_future.result()
        if not answer.get("success", False):
            raise SGLangServerError(f"SGLang server {self.url}: update_weights_from_distributed failed: {answer}")
        self._weight_update_session("/end_weight_update", {})

    def _weight_update_session(self, endpoint: str, payload: dict) -> None:
        """Open or close a weight-update session (SGLang >= 0.5.20 requires one; older servers answer 404)."""
        try:
            self._call(endpoint, payload)
        except SGLangServerError as exc:
            if exc.status != 404:
                raise

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast over the weight group if `init_weight_group` was called, else write and load from disk."""
        if self._weight_group is not None:
            self._broadcast_weights(named_tensors)
        else:
            self.update_weights_from_disk(self._write_checkpoint(named_tensors))

    def sleep(self) -> None:
        self._call("/release_memory_occupation", {})

    def wake(self) -> None:
        self._call("/resume_memory_occupation", {})

    def close(self) -> None:
        """Stop the client's threads; the server belongs to whoever started it and keeps running."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _new_weight_group(*, backend: str, init_method: str, world_size: int, group_name: str) -> Any:
    """Rank 0 of a process group shared with the server's workers, built the way SGLang builds its side (a TCP
    rendezvous, a store prefixed by the group name), and independent of any default group the trainer has."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=_WEIGHT_GROUP_TIMEOUT_S)
    store, _, _ = next(distributed_c10d.rendezvous(init_method, 0, world_size, timeout=timeout))
    group, _ = distributed_c10d._new_process_group_helper(
        world_size,
        0,
        [],
        distributed_c10d.Backend(backend),
        distributed_c10d.PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    return group


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

    def generate(self, requests: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        outputs = self._engine.generate(
            input_ids=[list(ids) for ids in requests], sampling_params=sampling_payload(sampling), return_logprob=True
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

    def wake(self) -> None:
        self._engine.resume_memory_occupation()

    def close(self) -> None:
        self._engine.shutdown()
