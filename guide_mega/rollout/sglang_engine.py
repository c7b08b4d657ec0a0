"""The SGLang client: a `RolloutEngine` over running SGLang servers (HTTP). The request and answer formats it
shares with the in-process colocated engine (`sglang_colocated.py`) are in `sglang_protocol.py`.

Separate servers (`SGLangServerEngine`): each generate call is spread over the servers that answer /health, balanced
by expected tokens (one URL, a server or an sgl-router that balances itself, gets everything). A request's own seed
travels as its `sampling_seed`; SGLang honours it only on servers started with `--enable-deterministic-inference`
(then a sample depends on nothing but its seed, wherever it lands), and the client warns about servers without it.
Weights reach every server, by `update_weights_from_disk` (safetensors in a directory the servers can read) or by
`update_weights_from_distributed` over one weight group spanning this process and all servers' workers
(`weight_group.py`: NCCL on GPUs, gloo on CPUs). `check_weights` reads a few tensors' first values back from every
server (`/get_weights_by_name`) and compares them with the trainer's.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import (
    WAKE_PARTS,
    Completion,
    SamplingParams,
    compare_weight_heads,
    weight_head,
)
from guide_mega.rollout.sglang_protocol import (
    RetryableServerError,
    SGLangServerError,
    SGLangServerUnavailable,
    completion_from_output,
    request_payloads,
    sglang_memory_tags,
    spread_over_servers,
)
from guide_mega.rollout.weight_group import (
    broadcast_from_rank0,
    destroy_weight_group,
    new_weight_group,
    rank_offsets,
    tensors_for_broadcast,
)

logger = logging.getLogger(__name__)

# HTTP statuses worth retrying: the server is starting, overloaded or restarting; anything else is our error.
_RETRY_STATUSES = (429, 502, 503, 504)
# Files a model directory needs besides its weights, copied next to pushed weights for update_weights_from_disk.
_MODEL_METADATA_GLOBS = ("config.json", "generation_config.json")
# Default for how long the weight group waits for the servers to join, and for each broadcast.
_WEIGHT_GROUP_TIMEOUT_S = 300.0
# A server that does not answer /health within this long is skipped for the call.
_HEALTH_TIMEOUT_S = 10.0
# A server's --dtype; "auto" (the checkpoint's) is taken as the coarsest a server runs.
_SERVER_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _in_background(function: Callable[..., Any], **kwargs: Any) -> Future:
    """Run `function` in a daemon thread: a weight-group call may wait as long as the group's timeout, and must not
    keep the interpreter alive after a failure elsewhere."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(**kwargs))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="sglang-weight-group").start()
    return future


class SGLangServerEngine:
    """`RolloutEngine` client of SGLang servers at `urls` (or of one sgl-router URL).

    Every HTTP call retries connection failures and 429/5xx answers `max_retries` times with exponential backoff,
    then raises SGLangServerError naming the server; other HTTP errors and timeouts raise at once. Each generate
    call goes to the servers that answer /health (the others are skipped with a warning, counted in
    `unhealthy_skips`), in chunks of `requests_per_call`, at most `max_concurrency` chunks in flight per server; a
    chunk whose server became unavailable moves to the next server. Weights, sleep and wake go to every server.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        requests_per_call: int = 16,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        weight_dir: str | Path | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.urls = [url.rstrip("/") for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls or len(set(self.urls)) != len(self.urls):
            raise ValueError(f"SGLangServerEngine: distinct server URLs expected, got {self.urls}")
        self.requests_per_call = requests_per_call
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.weight_dir = Path(weight_dir) if weight_dir is not None else None
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.sequences_served = dict.fromkeys(self.urls, 0)
        self.unhealthy_skips = dict.fromkeys(self.urls, 0)
        self.weight_group_ranks: dict[str, int] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency * len(self.urls), thread_name_prefix="sglang-http"
        )
        self._lock = threading.Lock()
        self._server_infos: dict[str, dict] = {}
        self._seed_checked: set[str] = set()
        self._weight_group: Any = None
        self._weight_group_name = ""
        self._weight_backend = ""
        self._weight_timeout_s = _WEIGHT_GROUP_TIMEOUT_S

    @classmethod
    def from_config(cls, config: RolloutConfig, **options: Any) -> SGLangServerEngine:
        """The client of `rollout.sglang_urls`, once every server answers /health (with the usual retries): a run
        whose servers are not up stops here, in one line, before any model loads."""
        if not config.sglang_urls:
            raise ValueError("rollout.sglang_urls: the SGLang server client needs at least one server URL")
        engine = cls(config.sglang_urls, **options)
        try:
            engine.check_health()
        except SGLangServerError as exc:
            engine.close()
            raise SGLangServerUnavailable(f"rollout.sglang_urls: {exc}; start the servers first") from None
        return engine

    @property
    def num_engines(self) -> int:
        return len(self.urls)

    @property
    def metrics(self) -> dict[str, float]:
        """Run totals: servers skipped by health checks (summed over calls and servers)."""
        return {"rollout/unhealthy_server_skips": float(sum(self.unhealthy_skips.values()))}

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _attempt(self, url: str, request: urllib.request.Request, endpoint: str, timeout_s: float) -> Any:
        """One HTTP exchange; raises RetryableServerError for failures worth another try, SGLangServerError for the
        rest."""
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = response.read()
            return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            message = f"SGLang server {url}{endpoint}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"
            if exc.code in _RETRY_STATUSES:
                raise RetryableServerError(message, status=exc.code) from None
            raise SGLangServerError(message, status=exc.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                # Not resent: the server may still be working on it, and a second copy would double its load.
                raise SGLangServerError(f"SGLang server {url}{endpoint}: no answer within {timeout_s:g} s") from None
            message = f"SGLang server {url} is not reachable ({endpoint}): {reason}; is it running?"
            raise RetryableServerError(message) from None

    def _call(
        self,
        url: str,
        endpoint: str,
        payload: dict | None = None,
        *,
        timeout_s: float | None = None,
        max_retries: int | None = None,
    ) -> Any:
        """POST `payload` (GET when None) to the server at `url`; the decoded JSON answer (None for an empty body)."""
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{url}{endpoint}", data=data, headers={"Content-Type": "application/json"})
        retries = self.max_retries if max_retries is None else max_retries
        for attempt in range(retries + 1):
            try:
                return self._attempt(url, request, endpoint, timeout_s or self.timeout_s)
            except RetryableServerError as exc:
                if attempt == retries:
                    raise SGLangServerUnavailable(f"{exc} ({attempt + 1} attempts)", status=exc.status) from None
                delay_s = self.retry_backoff_s * 2**attempt
                logger.warning("%s; retry in %.1f s", exc, delay_s)
                time.sleep(delay_s)

    def _call_all(self, endpoint: str, payload: dict | None = None, *, timeout_s: float | None = None) -> list[Any]:
        """The same call on every server at once; the answers in server order (the first failure raises)."""
        futures = [self._executor.submit(self._call, url, endpoint, payload, timeout_s=timeout_s) for url in self.urls]
        return [future.result() for future in futures]

    def _server_info(self, url: str, *, required: bool) -> dict:
        """The server's /server_info (/get_server_info before SGLang 0.5.x renamed it), fetched once; {} when it
        cannot be read and not `required` (a router has none)."""
        if url not in self._server_infos:
            try:
                try:
                    info = self._call(url, "/server_info")
                except SGLangServerError as exc:
                    if exc.status != 404:
                        raise
                    info = self._call(url, "/get_server_info")
            except SGLangServerError:
                if required:
                    raise
                return {}
            self._server_infos[url] = info if isinstance(info, dict) else {}
        return self._server_infos[url]

    # -- generation ----------------------------------------------------------------------------------------------
    def check_health(self, *, timeout_s: float = _HEALTH_TIMEOUT_S) -> None:
        """Raise SGLangServerError unless every server answers /health."""
        self._call_all("/health", timeout_s=timeout_s)

    def healthy_servers(self) -> list[int]:
        """Indices of the servers that answer /health now (one try each); the others are skipped with a warning and
        counted. Raises SGLangServerError naming every server when none answers."""
        futures = [
            self._executor.submit(self._call, url, "/health", timeout_s=_HEALTH_TIMEOUT_S, max_retries=0)
            for url in self.urls
        ]
        healthy, failures = [], []
        for index, (url, future) in enumerate(zip(self.urls, futures, strict=True)):
            if future.exception() is None:
                healthy.append(index)
                continue
            self.unhealthy_skips[url] += 1
            failures.append(f"{url} ({future.exception()})")
            logger.warning("SGLang server %s is skipped for this call: %s", url, future.exception())
        if not healthy:
            raise SGLangServerUnavailable(f"no SGLang server answers /health: {'; '.join(failures)}")
        return healthy

    def _warn_unless_seeded(self, servers: Sequence[int]) -> None:
        """Warn once per server that ignores `sampling_seed` (SGLang applies it only with deterministic inference)."""
        for server in servers:
            url = self.urls[server]
            if url in self._seed_checked:
                continue
            self._seed_checked.add(url)
            info = self._server_info(url, required=False)
            if info and not info.get("enable_deterministic_inference", False):
                logger.warning(
                    "SGLang server %s ignores per-request sampling seeds (start it with "
                    "--enable-deterministic-inference): its samples depend on batching and on where a request lands",
                    url,
                )

    def generate(
        self, requests: Sequence[Sequence[int]], sampling: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[Completion]:
        """Completions in request order, each tagged with the index of the server that made it
        (`metadata['engine']`). With `seeds`, request i carries `sampling_seed` seeds[i]."""
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        if not requests:
            return []
        # One URL (a server or a router) gets everything, with its retries; several are checked first.
        servers = self.healthy_servers() if len(self.urls) > 1 else [0]
        if not sampling.is_greedy and (seeds is not None or sampling.seed is not None):
            self._warn_unless_seeded(servers)
        params = request_payloads(sampling, seeds)
        jobs = []
        for position, share in enumerate(spread_over_servers(requests, sampling.max_new_tokens, len(servers))):
            order = servers[position:] + servers[:position]  # its own server first, then the others
            for start in range(0, len(share), self.requests_per_call):
                chunk = share[start : start + self.requests_per_call]
                jobs.append((chunk, self._executor.submit(self._generate_chunk, order, requests, params, chunk)))
        ordered: list[Completion | None] = [None] * len(requests)
        try:
            for chunk, future in jobs:
                for index, completion in zip(chunk, future.result(), strict=True):
                    ordered[index] = completion
        except SGLangServerUnavailable as exc:
            # Fail the step rather than restart a server this client does not own; the run resumes from its last
            # checkpoint once the server is back (docs/launch.md, "Faults").
            raise SGLangServerUnavailable(
                f"{exc}; this step's rollout failed: restart the server and run again (checkpoint.resume=auto "
                "resumes from the last checkpoint)",
                status=exc.status,
            ) from None
        return ordered

    def _generate_chunk(
        self, order: Sequence[int], requests: Sequence[Sequence[int]], params: dict | list, chunk: Sequence[int]
    ) -> list[Completion]:
        """Generate requests[chunk] on the first server of `order` that takes them."""
        body = {
            "input_ids": [list(requests[index]) for index in chunk],
            "sampling_params": params if isinstance(params, dict) else [params[index] for index in chunk],
            "return_logprob": True,
        }
        for attempt, server in enumerate(order):
            url = self.urls[server]
            try:
                outputs = self._call(url, "/generate", body)
            except SGLangServerError as exc:
                if not isinstance(exc, SGLangServerUnavailable) or attempt + 1 == len(order):
                    raise
                logger.warning("%s; its %d requests go to %s", exc, len(chunk), self.urls[order[attempt + 1]])
                continue
            if len(outputs) != len(chunk):
                raise SGLangServerError(f"SGLang server {url}: {len(outputs)} outputs for {len(chunk)} requests")
            with self._lock:
                self.sequences_served[url] += len(chunk)
            completions = [completion_from_output(output) for output in outputs]
            for completion in completions:
                completion.metadata["engine"] = server
            return completions
        raise AssertionError("unreachable: the last server's failure raises")

    # -- weights -------------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One bucket of weights to every server: a broadcast over the weight group if `init_weight_group` was
        called, else written to `weight_dir` and loaded from there by each server."""
        named_tensors = list(named_tensors)
        if self._weight_group is not None:
            self._broadcast_weights(named_tensors)
        else:
            self.update_weights_from_disk(self._write_checkpoint(named_tensors))

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """Make every server load the HF checkpoint at `model_path` (a path the servers can read)."""
        answers = self._call_all("/update_weights_from_disk", {"model_path": str(model_path), "flush_cache": True})
        for url, answer in zip(self.urls, answers, strict=True):
            if not answer.get("success", False):
                raise SGLangServerError(f"SGLang server {url}: update_weights_from_disk failed: {answer}")

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

    def _weight_ranks(self, url: str) -> int:
        """How many ranks the server's workers take in the weight group: its tensor-parallel size."""
        info = self._server_info(url, required=True)
        if "tp_size" not in info:
            raise SGLangServerError(
                f"{url}/server_info reports no tp_size: a weight group needs every server's own URL in "
                "rollout.sglang_urls (not a router's)"
            )
        if info.get("pp_size", 1) != 1 or (info.get("dp_size", 1) != 1 and not info.get("enable_dp_attention")):
            raise SGLangServerError(
                f"SGLang server {url}: a weight group needs pp_size 1 and dp_size 1 (or DP attention), got "
                f"pp_size {info.get('pp_size')} and dp_size {info.get('dp_size')}"
            )
        return int(info["tp_size"])

    def init_weight_group(
        self,
        *,
        master_address: str,
        master_port: int,
        backend: str,
        group_name: str = "guide_mega_weights",
        timeout_s: float = _WEIGHT_GROUP_TIMEOUT_S,
    ) -> None:
        """Build the weight group: this process is rank 0, server i's tensor-parallel workers take ranks from
        `rank_offsets(tp sizes)[i]` (`weight_group_ranks`). `timeout_s` bounds the joining and every broadcast."""
        tp_sizes = [self._weight_ranks(url) for url in self.urls]
        world_size = 1 + sum(tp_sizes)
        self._weight_timeout_s = timeout_s
        answers = {}
        for url, offset in zip(self.urls, rank_offsets(tp_sizes), strict=True):
            request = {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            }
            answers[url] = _in_background(
                self._call,
                url=url,
                endpoint="/init_weights_update_group",
                payload=request,
                timeout_s=self._weight_call_timeout_s,
            )
            self.weight_group_ranks[url] = offset
        group = _in_background(
            new_weight_group,
            backend=backend,
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            group_name=group_name,
            timeout_s=timeout_s,
        )
        self._await_group(group, answers, "init_weights_update_group")
        self._weight_group, self._weight_group_name, self._weight_backend = group.result(), group_name, backend
        logger.info("weight group %s: %d ranks, servers at %s", group_name, world_size, self.weight_group_ranks)

    @property
    def _weight_call_timeout_s(self) -> float:
        """HTTP timeout of calls that wait for the weight group: the server answers once its side is done."""
        return max(self.timeout_s, self._weight_timeout_s + 60.0)

    def _await_group(self, collective: Future, answers: dict[str, Future], call: str) -> None:
        """Wait for this process's side of a group operation and every server's answer to `call`; the first failure
        raises at once (a server that refused never joins, and waiting for it would last the group's timeout)."""
        pending = {collective, *answers.values()}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = next((future for future in done if future.exception() is not None), None)
            if failed is not None:
                self._weight_group = None  # a half-finished collective leaves the group unusable
                raise failed.exception()
        for url, future in answers.items():
            if not future.result().get("success", False):
                self._weight_group = None
                raise SGLangServerError(f"SGLang server {url}: {call} failed: {future.result()}")

    def _broadcast_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        tensors = tensors_for_broadcast([tensor for _, tensor in named_tensors], self._weight_backend)
        request = {
            "names": [name for name, _ in named_tensors],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for tensor in tensors],
            "shapes": [list(tensor.shape) for tensor in tensors],
            "group_name": self._weight_group_name,
            "flush_cache": True,
        }
        self._weight_update_session("/begin_weight_update")
        answers = {
            url: _in_background(
                self._call,
                url=url,
                endpoint="/update_weights_from_distributed",
                payload=request,
                timeout_s=self._weight_call_timeout_s,
            )
            for url in self.urls
        }
        sent = _in_background(broadcast_from_rank0, group=self._weight_group, tensors=tensors)
        self._await_group(sent, answers, "update_weights_from_distributed")
        self._weight_update_session("/end_weight_update")

    def _weight_update_session(self, endpoint: str) -> None:
        """Open or close a weight-update session on every server (SGLang >= 0.5.20 requires one; older servers
        answer 404)."""
        for url in self.urls:
            try:
                self._call(url, endpoint, {})
            except SGLangServerError as exc:
                if exc.status != 404:
                    raise

    def check_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise WeightSyncError naming the server and tensor unless every server holds these tensors' first values
        (`weight_head`: the trainer's, after a push) within the rounding of the two dtypes.

        A server reads them with /get_weights_by_name, from its tensor-parallel shard 0: the first rows of a matrix
        are the full tensor's as long as a shard has that many rows.
        """
        expected = [(name, weight_head(tensor), tensor.dtype) for name, tensor in named_tensors]
        for url in self.urls:
            info = self._server_info(url, required=False)
            server_dtype = _SERVER_DTYPES.get(str(info.get("dtype")), torch.bfloat16)
            for name, head, dtype in expected:
                held = self._call(url, "/get_weights_by_name", {"name": name, "truncate_size": head.shape[0]})
                if info.get("dp_size", 1) > 1:
                    held = held[0]  # one answer per data-parallel rank
                tolerance = max(torch.finfo(dtype).eps, torch.finfo(server_dtype).eps)
                compare_weight_heads(
                    f"SGLang server {url}", name, torch.tensor(held, dtype=torch.float32), head, tolerance
                )

    # -- memory and lifetime -------------------------------------------------------------------------------------
    def sleep(self) -> None:
        self._call_all("/release_memory_occupation", {})

    def wake(self, *, parts: Sequence[str] = WAKE_PARTS) -> None:
        self._call_all("/resume_memory_occupation", {"tags": sglang_memory_tags(parts)})

    def close(self) -> None:
        """Release the weight group and the client's threads; the servers belong to whoever started them."""
        if self._weight_group is not None:
            destroy_weight_group(self._weight_group)
            self._weight_group = None
        self._executor.shutdown(wait=False, cancel_futures=True)
