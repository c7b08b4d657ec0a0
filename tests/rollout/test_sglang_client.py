"""SGLangServerEngine against a fake SGLang HTTP server on loopback: payloads, parsing, concurrency, retries."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import SamplingParams
from guide_mega.rollout.factory import create_rollout_engine
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_engine import SGLangServerEngine, SGLangServerError, sampling_payload


class FakeSGLang(BaseHTTPRequestHandler):
    """Echoes the first three prompt tokens back as the response; counts calls and concurrent generations."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._reply(200, {}) if self.path == "/health" else self._reply(404, {"detail": "no"})

    def do_POST(self):
        state = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["calls"].append((self.path, body))
        if state["fail_next"] > 0:
            state["fail_next"] -= 1
            return self._reply(503, {"detail": "starting"})
        if self.path == "/update_weights_from_disk":
            return self._reply(200, {"success": True, "message": "ok"})
        if self.path != "/generate":
            return self._reply(400, {"detail": f"unknown {self.path}"})
        with state["lock"]:
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        time.sleep(0.05)
        outputs = [
            {
                "text": "echo",
                "meta_info": {
                    "output_token_logprobs": [[-0.5 * (k + 1), token, None] for k, token in enumerate(ids[:3])],
                    "finish_reason": {"type": "length", "length": 3}
                    if len(ids) > 2
                    else {"type": "stop", "matched": 2},
                },
            }
            for ids in body["input_ids"]
        ]
        with state["lock"]:
            state["in_flight"] -= 1
        self._reply(200, outputs)


@pytest.fixture
def fake_server():
    FakeSGLang.state = {"calls": [], "fail_next": 0, "in_flight": 0, "max_in_flight": 0, "lock": threading.Lock()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeSGLang.state
    server.shutdown()
    server.server_close()


def test_generate_maps_sampling_and_parses_completions(fake_server):
    url, state = fake_server
    engine = SGLangServerEngine(url, requests_per_call=2, max_concurrency=4)
    engine.check_health()
    requests = [[10 + index, 20, 30, 40] for index in range(7)] + [[5, 6]]
    sampling = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=3, stop=("\n\n",), seed=4)
    completions = engine.generate(requests, sampling)
    assert [c.response_ids for c in completions] == [ids[:3] for ids in requests]
    assert completions[0].logprobs == [-0.5, -1.0, -1.5]
    assert [c.finish_reason for c in completions] == ["length"] * 7 + ["stop"]
    generate_calls = [body for path, body in state["calls"] if path == "/generate"]
    assert len(generate_calls) == 4 and state["max_in_flight"] > 1
    assert generate_calls[0]["return_logprob"] is True
    assert generate_calls[0]["sampling_params"] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_new_tokens": 3,
        "stop": ["\n\n"],
        "stop_token_ids": [],
        "no_stop_trim": True,
        "skip_special_tokens": True,
        "ignore_eos": False,
        "sampling_seed": 4,
    }
    assert "sampling_seed" not in sampling_payload(SamplingParams())


def test_retries_then_succeeds(fake_server):
    url, state = fake_server
    state["fail_next"] = 2
    engine = SGLangServerEngine(url, max_retries=3, retry_backoff_s=0.01)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))[0].response_ids == [1, 2, 3]
    state["fail_next"] = 5
    with pytest.raises(SGLangServerError, match=r"/generate: HTTP 503"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))


def test_client_errors_are_not_retried(fake_server):
    url, state = fake_server
    engine = SGLangServerEngine(url, max_retries=3, retry_backoff_s=0.01)
    with pytest.raises(SGLangServerError, match="HTTP 400") as info:
        engine.sleep()
    assert info.value.status == 400 and len(state["calls"]) == 1


def test_clear_error_when_the_server_is_gone():
    engine = SGLangServerEngine("http://127.0.0.1:9", max_retries=1, retry_backoff_s=0.01, timeout_s=2)
    with pytest.raises(
        SGLangServerError, match=r"http://127\.0\.0\.1:9 is not reachable \(/health\): .* \(2 attempts\)"
    ):
        engine.check_health()


def test_disk_weight_update_writes_a_loadable_checkpoint(fake_server, tmp_path):
    url, state = fake_server
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    engine = SGLangServerEngine(url, weight_dir=tmp_path / "push", model_dir=model_dir)
    weights = {"model.norm.weight": torch.ones(4), "lm_head.weight": torch.zeros(2, 4, dtype=torch.bfloat16)}
    engine.update_weights(iter(weights.items()))
    assert state["calls"][-1] == (
        "/update_weights_from_disk",
        {"model_path": str(tmp_path / "push"), "flush_cache": True},
    )
    loaded = load_file(tmp_path / "push" / "model.safetensors")
    assert torch.equal(loaded["lm_head.weight"], weights["lm_head.weight"])
    assert (tmp_path / "push" / "config.json").is_file()
    with pytest.raises(ValueError, match="need weight_dir and model_dir"):
        SGLangServerEngine(url).update_weights(iter(weights.items()))


def test_factory_picks_the_configured_engine(tiny_model_dir, fake_server):
    assert isinstance(create_rollout_engine(tiny_model_dir, RolloutConfig(engine="hf")), HFEngine)
    url, _ = fake_server
    client = create_rollout_engine(tiny_model_dir, RolloutConfig(engine="sglang", sglang_url=url))
    assert isinstance(client, SGLangServerEngine)
    assert client.weight_dir == tiny_model_dir.with_name(f"{tiny_model_dir.name}.rollout_weights")


def test_timeouts_are_not_resent(fake_server):
    url, state = fake_server
    engine = SGLangServerEngine(url, timeout_s=0.01, max_retries=3, retry_backoff_s=0.01)
    with pytest.raises(SGLangServerError, match=r"/generate: no answer within 0\.01 s"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    time.sleep(0.1)
    assert [path for path, _ in state["calls"]] == ["/generate"]
