"""SGLangServerEngine against fake SGLang HTTP servers on loopback (tests/rollout/fake_sglang.py): payloads, parsing,
concurrency, retries, spreading over several servers, health checks, per-request seeds, and the weight group (real
gloo broadcasts to the fakes' worker threads), including under torchrun."""

import logging
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from guide_mega.config import RolloutConfig
from guide_mega.rollout.engine import CHECKED_WEIGHTS, SamplingParams, WeightSyncError
from guide_mega.rollout.factory import create_rollout_engine
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_engine import SGLangServerEngine
from guide_mega.rollout.sglang_protocol import SGLangServerError, sampling_payload, spread_over_servers
from guide_mega.rollout.sglang_server import free_port
from guide_mega.rollout.weight_group import own_rendezvous_store, tensors_for_broadcast
from tests.training.torchrun_launch import run_torchrun

from .fake_sglang import FakeSGLangServer


@pytest.fixture
def fake_servers():
    """Start fake servers on demand: fake_servers(tp_size=...) -> FakeSGLangServer; all closed afterwards."""
    started = []

    def start(**options):
        started.append(FakeSGLangServer(**options))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def fake_server(fake_servers):
    return fake_servers()


def test_generate_maps_sampling_and_parses_completions(fake_server):
    # Each call takes 0.5 s on the server: calls sent concurrently overlap there however slowly the client starts them.
    fake_server.delay_s = 0.5
    engine = SGLangServerEngine(fake_server.url, requests_per_call=2, max_concurrency=4)
    engine.check_health()
    requests = [[10 + index, 20, 30, 40] for index in range(7)] + [[5, 6]]
    sampling = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=3, stop=("\n\n",), seed=4)
    completions = engine.generate(requests, sampling)
    assert [c.response_ids for c in completions] == [ids[:3] for ids in requests]
    assert completions[0].logprobs == [-0.5, -1.0, -1.5]
    assert [c.finish_reason for c in completions] == ["length"] * 7 + ["stop"]
    generate_calls = [body for path, body in fake_server.calls if path == "/generate"]
    assert len(generate_calls) == 4 and fake_server.max_in_flight > 1
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


def test_per_request_seeds_travel_with_their_requests(fake_servers):
    """Each request gets its own sampling_seed (a list of sampling_params, one per input); the completions come
    back in request order with their own seeds however the requests were spread."""
    one, two = fake_servers(), fake_servers()
    requests = [[1, 2, 3, 4]] * 3 + [[7, 8, 9]] * 5 + [[4, 4, 4, 4, 4, 4]] * 2
    seeds = [1000 + index for index in range(len(requests))]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=3)
    texts = {}
    for urls in ([one.url], [one.url, two.url]):
        completions = SGLangServerEngine(urls, requests_per_call=2).generate(requests, sampling, seeds=seeds)
        texts[len(urls)] = [c.text for c in completions]
        assert [c.response_ids for c in completions] == [ids[:3] for ids in requests]
    assert texts[1] == texts[2] == [f"seed={seed}" for seed in seeds]
    body = next(body for path, body in two.calls if path == "/generate")
    assert isinstance(body["sampling_params"], list) and len(body["sampling_params"]) == len(body["input_ids"])
    # Without seeds, one sampling_params dict for all (and no sampling_seed): today's behaviour.
    SGLangServerEngine(one.url).generate(requests[:2], sampling)
    assert one.calls[-1][1]["sampling_params"] == sampling_payload(sampling)
    with pytest.raises(ValueError, match="2 seeds for 10 requests"):
        SGLangServerEngine(one.url).generate(requests, sampling, seeds=[1, 2])


def test_requests_spread_over_servers_balanced_by_expected_tokens(fake_servers):
    servers = [fake_servers(), fake_servers()]
    # Eight GRPO groups of four samples, prompts of 2..9 tokens.
    prompts = [list(range(100 + length, 100 + 2 * length)) for length in range(2, 10)]
    requests = [prompt for prompt in prompts for _ in range(4)]
    engine = SGLangServerEngine([server.url for server in servers], requests_per_call=3)
    completions = engine.generate(requests, SamplingParams(max_new_tokens=5), seeds=range(len(requests)))
    assert [c.response_ids for c in completions] == [ids[:3] for ids in requests]
    served = [server.generated_requests() for server in servers]
    assert sorted(map(tuple, served[0] + served[1])) == sorted(map(tuple, requests))
    loads = [sum(len(ids) + 5 for ids in share) for share in served]
    assert abs(loads[0] - loads[1]) <= 4 * (9 + 5), loads  # at most one group apart
    assert engine.sequences_served == {server.url: len(share) for server, share in zip(servers, served, strict=True)}
    for prompt in prompts:  # a group stays on one server (its prefix cache prefills the prompt once)
        assert sum(prompt in share for share in served) == 1
    engines = [c.metadata["engine"] for c in completions]
    assert [engines[i] for i in range(0, len(requests), 4)] == [int(prompt not in served[0]) for prompt in prompts]


def test_spread_over_servers_cuts_a_run_larger_than_a_share():
    assert spread_over_servers([[1, 2]] * 64, 6, 2) == [list(range(32)), list(range(32, 64))]
    shares = spread_over_servers([[1], [2], [2], [3, 3, 3]], 1, 3)
    assert sorted(index for share in shares for index in share) == [0, 1, 2, 3]
    assert [1, 2] in shares  # the two copies of [2] stay together
    assert spread_over_servers([[5]], 4, 3) == [[0], [], []]


def test_unhealthy_servers_are_skipped_and_counted(fake_servers, caplog):
    sick, healthy = fake_servers(), fake_servers()
    sick.unhealthy = True
    gone = f"http://127.0.0.1:{free_port()}"
    engine = SGLangServerEngine([sick.url, gone, healthy.url], retry_backoff_s=0.01)
    with caplog.at_level(logging.WARNING):
        completions = engine.generate([[1, 2, 3]] * 6, SamplingParams(max_new_tokens=3))
    assert [c.metadata["engine"] for c in completions] == [2] * 6
    assert not sick.generated_requests() and len(healthy.generated_requests()) == 6
    assert engine.unhealthy_skips == {sick.url: 1, gone: 1, healthy.url: 0}
    assert engine.metrics["rollout/unhealthy_server_skips"] == 2.0
    assert f"SGLang server {sick.url} is skipped" in caplog.text and f"{gone} is skipped" in caplog.text
    healthy.unhealthy = True
    with pytest.raises(SGLangServerError, match="no SGLang server answers /health") as info:
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert all(url in str(info.value) for url in (sick.url, gone, healthy.url))


def test_a_chunk_moves_on_when_its_server_stops_taking_requests(fake_servers):
    failing, working = fake_servers(), fake_servers()
    failing.fail_next = 1000  # healthy by /health, but every POST answers 503
    engine = SGLangServerEngine([failing.url, working.url], max_retries=1, retry_backoff_s=0.01, requests_per_call=2)
    completions = engine.generate([[k, k, k] for k in range(8)], SamplingParams(max_new_tokens=3))
    assert [c.response_ids for c in completions] == [[k, k, k] for k in range(8)]
    assert {c.metadata["engine"] for c in completions} == {1}
    assert engine.sequences_served == {failing.url: 0, working.url: 8}


def test_retries_then_succeeds(fake_server):
    fake_server.fail_next = 2
    engine = SGLangServerEngine(fake_server.url, max_retries=3, retry_backoff_s=0.01)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))[0].response_ids == [1, 2, 3]
    fake_server.fail_next = 5
    with pytest.raises(SGLangServerError, match=r"/generate: HTTP 503"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))


def test_client_errors_are_not_retried(fake_server):
    fake_server.routes.pop("/release_memory_occupation")
    engine = SGLangServerEngine(fake_server.url, max_retries=3, retry_backoff_s=0.01)
    with pytest.raises(SGLangServerError, match="HTTP 400") as info:
        engine.sleep()
    assert info.value.status == 400 and len(fake_server.calls) == 1


def test_sleep_and_wake_reach_every_server(fake_servers):
    servers = [fake_servers(), fake_servers()]
    engine = SGLangServerEngine([server.url for server in servers])
    engine.sleep()
    engine.wake(parts=("weights",))
    engine.wake(parts=("kv_cache",))
    for server in servers:
        assert [path for path, _ in server.calls] == ["/release_memory_occupation"] + ["/resume_memory_occupation"] * 2
        assert [body for _, body in server.calls[1:]] == [{"tags": ["weights"]}, {"tags": ["kv_cache", "cuda_graph"]}]


def test_clear_error_when_the_server_is_gone():
    engine = SGLangServerEngine("http://127.0.0.1:9", max_retries=1, retry_backoff_s=0.01, timeout_s=2)
    with pytest.raises(
        SGLangServerError, match=r"http://127\.0\.0\.1:9 is not reachable \(/health\): .* \(2 attempts\)"
    ):
        engine.check_health()


def test_disk_weight_update_writes_a_loadable_checkpoint(fake_servers, tmp_path):
    servers = [fake_servers(), fake_servers()]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    engine = SGLangServerEngine([server.url for server in servers], weight_dir=tmp_path / "push", model_dir=model_dir)
    weights = {"model.norm.weight": torch.ones(4), "lm_head.weight": torch.zeros(2, 4, dtype=torch.bfloat16)}
    engine.update_weights(iter(weights.items()))
    for server in servers:
        assert server.calls[-1] == (
            "/update_weights_from_disk",
            {"model_path": str(tmp_path / "push"), "flush_cache": True},
        )
    loaded = load_file(tmp_path / "push" / "model.safetensors")
    assert torch.equal(loaded["lm_head.weight"], weights["lm_head.weight"])
    assert (tmp_path / "push" / "config.json").is_file()
    with pytest.raises(ValueError, match="need weight_dir and model_dir"):
        SGLangServerEngine(servers[0].url).update_weights(iter(weights.items()))


def test_factory_picks_the_configured_engine(tiny_model_dir, fake_servers):
    assert isinstance(create_rollout_engine(tiny_model_dir, RolloutConfig(engine="hf")), HFEngine)
    urls = [fake_servers().url, fake_servers().url]
    client = create_rollout_engine(tiny_model_dir, RolloutConfig(engine="sglang", sglang_urls=urls))
    assert isinstance(client, SGLangServerEngine) and client.urls == urls
    assert client.weight_dir == tiny_model_dir.with_name(f"{tiny_model_dir.name}.rollout_weights")


def test_timeouts_are_not_resent(fake_server):
    engine = SGLangServerEngine(fake_server.url, timeout_s=0.01, max_retries=3, retry_backoff_s=0.01)
    with pytest.raises(SGLangServerError, match=r"/generate: no answer within 0\.01 s"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    # The server may record the request after the client gave up on it; a resend would come right after.
    deadline = time.monotonic() + 5.0
    while not fake_server.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert [path for path, _ in fake_server.calls] == ["/generate"]


def test_one_weight_group_reaches_every_server_at_its_rank_offset(fake_servers):
    """A server with one worker and one with two: ranks 1 and 2..3 of a world of 4; each bucket's broadcast reaches
    both, and check_weights reads the sampled tensors back from each."""
    single, double = fake_servers(), fake_servers(tp_size=2)
    engine = SGLangServerEngine([single.url, double.url])
    engine.init_weight_group(master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout_s=60)
    for server, offset in ((single, 1), (double, 2)):
        path, request = next(call for call in server.calls if call[0] == "/init_weights_update_group")
        assert (request["rank_offset"], request["world_size"], request["backend"]) == (offset, 4, "gloo")
    assert engine.weight_group_ranks == {single.url: 1, double.url: 2}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    buckets = [
        [("model.embed_tokens.weight", torch.randn(50, 8)), (q_proj, torch.randn(8, 8))],
        [("model.layers.0.mlp.up_proj.weight", torch.randn(16, 8)), ("model.norm.weight", torch.randn(8).bfloat16())],
    ]
    for bucket in buckets:
        engine.update_weights(bucket)
    for server in (single, double):
        for name, tensor in (pair for bucket in buckets for pair in bucket):
            assert torch.equal(server.weights[name], tensor), (server.url, name)
    checked = [(name, tensor) for bucket in buckets for name, tensor in bucket if CHECKED_WEIGHTS.search(name)]
    assert [name for name, _ in checked] == ["model.embed_tokens.weight", q_proj, "model.norm.weight"]
    engine.check_weights(checked)
    double.weights["model.embed_tokens.weight"][2, 3] += 0.5
    with pytest.raises(WeightSyncError, match=rf"{double.url} holds other values of model\.embed_tokens\.weight"):
        engine.check_weights(checked)
    engine.close()


def test_weight_group_refused_by_a_server_fails_at_once(fake_servers):
    willing, refusing = fake_servers(), fake_servers()
    refusing.routes["/init_weights_update_group"] = lambda body: (400, {"success": False, "message": "bad backend"})
    willing.group_timeout_s = 5.0  # its worker gives up waiting for the group soon after the test
    engine = SGLangServerEngine([willing.url, refusing.url], retry_backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(SGLangServerError, match=rf"{refusing.url}/init_weights_update_group: HTTP 400.*bad backend"):
        engine.init_weight_group(master_address="127.0.0.1", master_port=free_port(), backend="gloo", timeout_s=120)
    assert time.monotonic() - start < 30
    engine.close()


def test_a_router_url_cannot_join_a_weight_group(fake_server):
    fake_server.server_info = {"version": "router"}
    with pytest.raises(SGLangServerError, match="needs every server's own URL"):
        SGLangServerEngine(fake_server.url).init_weight_group(
            master_address="127.0.0.1", master_port=free_port(), backend="gloo"
        )


def test_broadcast_tensors_are_on_the_backends_device():
    strided = torch.randn(4, 6).t()
    [placed] = tensors_for_broadcast([strided], "gloo")
    assert placed.device.type == "cpu" and placed.is_contiguous() and torch.equal(placed, strided)


def test_the_agent_store_variable_is_set_aside_and_restored(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with own_rendezvous_store():
        assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    with own_rendezvous_store():
        pass
    assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ


def test_weight_group_builds_under_torchrun():
    """torchrun sets TORCHELASTIC_USE_AGENT_STORE=True; without setting it aside, rank 0's rendezvous waits as a
    client for a store nobody hosts and the group never forms (here: fails after its 30 s timeout). A fake server's
    gloo worker stands in for a real SGLang server (tests/rollout/weight_group_worker.py)."""
    run_torchrun(2, "30", module="tests.rollout.weight_group_worker")
