"""A fake SGLang server on loopback: the slice of SGLang's HTTP API that SGLangServerEngine uses, with a real weight
group. Its tensor-parallel "workers" are threads that join the client's torch.distributed group (gloo) at the rank
offset they are given and receive every broadcast, as SGLang's workers do.

Generation echoes the first three prompt tokens (logprobs -0.5, -1.0, -1.5) and reports the request's
`sampling_seed` in the text (`seed=<n>`), so a test sees which seed reached which request.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore


class _Workers:
    """The server's tensor-parallel workers in the weight group: one gloo rank per thread, built with the store
    prefixes `torch.distributed`'s group helper uses (what SGLang's `init_custom_process_group` ends up with)."""

    def __init__(self, request: dict, tp_size: int, timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.groups: list[Any] = [None] * tp_size
        name = request["group_name"]

        def join(tp_rank: int) -> None:
            store = TCPStore(
                request["master_address"], request["master_port"], request["world_size"], False, timeout=timeout
            )
            prefixed = PrefixStore("cpu/", PrefixStore(f"{name}/", PrefixStore(name, store)))
            rank = request["rank_offset"] + tp_rank
            self.groups[tp_rank] = ProcessGroupGloo(prefixed, rank, request["world_size"], timeout=timeout)

        self._run_all(join)

    def _run_all(self, function) -> list:
        results: list = [None] * len(self.groups)
        errors: list = []

        def run(tp_rank: int) -> None:
            try:
                results[tp_rank] = function(tp_rank)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(tp_rank,)) for tp_rank in range(len(self.groups))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results

    def receive(self, request: dict) -> dict[str, torch.Tensor]:
        """Every worker receives the broadcast of each tensor; worker 0's copies are returned."""

        def receive_all(tp_rank: int) -> dict[str, torch.Tensor]:
            tensors = {}
            for name, dtype, shape in zip(request["names"], request["dtypes"], request["shapes"], strict=True):
                tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype))
                self.groups[tp_rank].broadcast(tensors[name], 0).wait()
            return tensors

        return self._run_all(receive_all)[0]


class _Handler(BaseHTTPRequestHandler):
    server: FakeSGLangServer

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        fake = self.server
        if self.path == "/health":
            return self._reply(503 if fake.unhealthy else 200, {})
        if self.path == "/server_info":
            return self._reply(200, fake.server_info)
        return self._reply(404, {"detail": "no"})

    def do_POST(self):
        fake = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake.calls.append((self.path, body))
        if fake.fail_next > 0:
            fake.fail_next -= 1
            return self._reply(503, {"detail": "starting"})
        handler = fake.routes.get(self.path)
        if handler is None:
            return self._reply(400 if self.path != "/begin_weight_update" else 404, {"detail": f"unknown {self.path}"})
        status, answer = handler(body)
        self._reply(status, answer)


class FakeSGLangServer(ThreadingHTTPServer):
    """A fake SGLang server with `tp_size` workers; `calls` records every POST (endpoint, body)."""

    daemon_threads = True

    def __init__(self, *, tp_size: int = 1, delay_s: float = 0.05) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.tp_size, self.delay_s = tp_size, delay_s
        self.group_timeout_s = 60.0
        self.server_info = {
            "tp_size": tp_size,
            "pp_size": 1,
            "dp_size": 1,
            "dtype": "float32",
            "enable_deterministic_inference": True,
        }
        self.calls: list[tuple[str, dict]] = []
        self.fail_next = 0
        self.unhealthy = False
        self.weights: dict[str, torch.Tensor] = {}
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._workers: _Workers | None = None
        self.routes = {
            "/generate": self._generate,
            "/update_weights_from_disk": lambda body: (200, {"success": True, "message": "ok"}),
            "/init_weights_update_group": self._init_group,
            "/update_weights_from_distributed": self._receive_weights,
            "/get_weights_by_name": self._weights_by_name,
            "/end_weight_update": lambda body: (200, {"success": True, "message": "ok"}),
            "/release_memory_occupation": lambda body: (200, None),
            "/resume_memory_occupation": lambda body: (200, None),
        }
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def generated_requests(self) -> list[list[int]]:
        """Every prompt this server generated for, in arrival order."""
        return [ids for path, body in self.calls if path == "/generate" for ids in body["input_ids"]]

    def _generate(self, body: dict) -> tuple[int, list]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        params = body["sampling_params"]
        params = params if isinstance(params, list) else [params] * len(body["input_ids"])
        outputs = [
            {
                "text": f"seed={sampling.get('sampling_seed')}",
                "meta_info": {
                    "output_token_logprobs": [[-0.5 * (k + 1), token, None] for k, token in enumerate(ids[:3])],
                    "finish_reason": {"type": "length", "length": 3} if len(ids) > 2 else {"type": "stop"},
                },
            }
            for ids, sampling in zip(body["input_ids"], params, strict=True)
        ]
        with self._lock:
            self.in_flight -= 1
        return 200, outputs

    def _init_group(self, body: dict) -> tuple[int, dict]:
        self._workers = _Workers(body, self.tp_size, self.group_timeout_s)
        return 200, {"success": True, "message": "ok"}

    def _receive_weights(self, body: dict) -> tuple[int, dict]:
        self.weights.update(self._workers.receive(body))
        return 200, {"success": True, "message": "ok"}

    def _weights_by_name(self, body: dict) -> tuple[int, Any]:
        if body["name"] not in self.weights:
            return 400, {"error": {"message": "Get parameter by name failed"}}
        return 200, self.weights[body["name"]][: body["truncate_size"]].float().tolist()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
