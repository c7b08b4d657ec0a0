"""A real SGLang server on CPU (own virtual environment, tiny local model, loopback): generation, logprobs and
weight updates agree with HFEngine; two servers behind one client share requests and one weight group. Marked
`sglang`; skipped unless the environment is built or may be built.

The environment (sglang 0.5.21 with a CPU torch, ~2.6 GB, ~3 min to build) lives in $GUIDE_MEGA_SGLANG_VENV or
~/.cache/guide_mega/sglang-0.5.21-cpu; set GUIDE_MEGA_BUILD_SGLANG_VENV=1 to let this test build it.
"""

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from guide_mega.data.embedded_model import default_cache_dir
from guide_mega.rollout.engine import CHECKED_WEIGHTS, SamplingParams, bucket_named_tensors
from guide_mega.rollout.hf_engine import HFEngine
from guide_mega.rollout.sglang_engine import SGLangServerEngine
from guide_mega.rollout.sglang_server import SGLANG_VERSION, LocalSGLangServer, build_cpu_venv, free_port

from .conftest import make_tiny_llama

pytestmark = pytest.mark.sglang

# Same fp32 weights, two implementations (SGLang's native CPU kernels vs transformers): summation order only.
LOGPROB_ATOL = 1e-4


def sglang_venv() -> Path:
    venv = Path(os.environ.get("GUIDE_MEGA_SGLANG_VENV") or default_cache_dir() / f"sglang-{SGLANG_VERSION}-cpu")
    if not (venv / ".guide_mega_ready").is_file() and os.environ.get("GUIDE_MEGA_BUILD_SGLANG_VENV") != "1":
        pytest.skip(f"no SGLang CPU environment at {venv}; set GUIDE_MEGA_BUILD_SGLANG_VENV=1 to build it")
    return build_cpu_venv(venv)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    with LocalSGLangServer(sglang_venv(), tiny_model_dir, log_path=log_path) as running:
        yield running


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    torch.set_num_threads(2)
    return HFEngine(tiny_model_dir)


def test_greedy_tokens_and_logprobs_match_hf(server, hf_engine, prompt_ids):
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    sglang_completions = SGLangServerEngine(server.url).generate(prompt_ids, greedy)
    hf_completions = hf_engine.generate(prompt_ids, greedy)
    for ours, theirs in zip(hf_completions, sglang_completions, strict=True):
        assert ours.response_ids == theirs.response_ids and theirs.finish_reason == "length"
        torch.testing.assert_close(
            torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), atol=LOGPROB_ATOL, rtol=0
        )


def test_sampled_logprobs_follow_the_engine_convention(server, hf_engine, prompt_ids):
    sampling = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=8, seed=1)
    for prompt, completion in zip(
        prompt_ids, SGLangServerEngine(server.url).generate(prompt_ids, sampling), strict=True
    ):
        with torch.no_grad():
            logits_RV = hf_engine.model(torch.tensor([prompt + completion.response_ids])).logits[
                0, len(prompt) - 1 : -1
            ]
        expected_R = torch.log_softmax(logits_RV / 0.7, dim=-1).gather(
            1, torch.tensor(completion.response_ids)[:, None]
        )
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected_R[:, 0], atol=LOGPROB_ATOL, rtol=0)


def test_many_concurrent_requests(server, prompt_ids):
    engine = SGLangServerEngine(server.url, requests_per_call=2, max_concurrency=16)
    requests = prompt_ids * 16
    completions = engine.generate(requests, SamplingParams(temperature=0, max_new_tokens=6))
    assert len(completions) == 64
    assert [c.response_ids for c in completions] == [c.response_ids for c in completions[:4]] * 16


def new_weights(tokenizer, seed):
    return list(make_tiny_llama(tokenizer, seed=seed).state_dict().items())


def test_weight_updates_from_disk_and_by_broadcast(server, tiny_model_dir, smollm2_tokenizer, prompt_ids, tmp_path):
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    engine = SGLangServerEngine(server.url, weight_dir=tmp_path / "weights", model_dir=tiny_model_dir)
    reference = HFEngine(tiny_model_dir)
    before = [c.response_ids for c in engine.generate(prompt_ids, greedy)]
    for seed, use_broadcast in ((1, False), (2, True)):
        if use_broadcast:
            engine.init_weight_group(master_address="127.0.0.1", master_port=free_port(), backend="gloo")
        weights = new_weights(smollm2_tokenizer, seed)
        engine.update_weights(iter(weights))
        reference.update_weights(iter(weights))
        updated = engine.generate(prompt_ids, greedy)
        expected = reference.generate(prompt_ids, greedy)
        assert [c.response_ids for c in updated] == [c.response_ids for c in expected] != before
        for ours, theirs in zip(expected, updated, strict=True):
            torch.testing.assert_close(
                torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), atol=LOGPROB_ATOL, rtol=0
            )
    engine.close()


def assert_same_generations(engine, reference, prompts, sampling):
    for ours, theirs in zip(reference.generate(prompts, sampling), engine.generate(prompts, sampling), strict=True):
        assert theirs.response_ids == ours.response_ids
        torch.testing.assert_close(
            torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), atol=LOGPROB_ATOL, rtol=0
        )


def test_two_servers_behind_one_client(server, tiny_model_dir, smollm2_tokenizer, prompt_ids, tmp_path, caplog):
    """Separate mode: two servers (the module's and a second one) behind one client. Weights pushed in buckets over
    one gloo weight group (ranks 0, 1, 2) reach both: each server's own greedy tokens and logprobs after the push
    equal HFEngine's with the pushed weights, and check_weights reads them back. Requests spread over both."""
    with LocalSGLangServer(sglang_venv(), tiny_model_dir, log_path=tmp_path / "second.log") as second:
        engine = SGLangServerEngine([server.url, second.url], requests_per_call=2)
        engine.init_weight_group(
            master_address="127.0.0.1", master_port=free_port(), backend="gloo", group_name="pair", timeout_s=120
        )
        assert engine.weight_group_ranks == {server.url: 1, second.url: 2}
        weights = new_weights(smollm2_tokenizer, 4)
        for bucket in bucket_named_tensors(iter(weights), bucket_bytes=1 << 20):
            engine.update_weights(bucket)
        checked = [(name, tensor) for name, tensor in weights if CHECKED_WEIGHTS.search(name)]
        assert {name for name, _ in checked} >= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        engine.check_weights(checked)
        reference = HFEngine(tiny_model_dir)
        reference.update_weights(iter(weights))
        greedy = SamplingParams(temperature=0, max_new_tokens=6)
        for url in engine.urls:
            assert_same_generations(SGLangServerEngine(url), reference, prompt_ids, greedy)

        requests = [ids for ids in prompt_ids for _ in range(3)]  # four groups of three samples
        expected = [c.response_ids for c in reference.generate(prompt_ids, greedy) for _ in range(3)]
        completions = engine.generate(requests, greedy)
        assert [c.response_ids for c in completions] == expected
        assert {c.metadata["engine"] for c in completions} == {0, 1}
        assert all(count > 0 for count in engine.sequences_served.values())
        # Per-request seeds reach the servers (a list of sampling_params); a CPU server cannot run deterministic
        # inference, so it ignores them, and the client says so.
        with caplog.at_level(logging.WARNING):
            sampled = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=4), seeds=range(12))
        assert len(sampled) == 12 and "ignores per-request sampling seeds" in caplog.text
        engine.close()


COLOCATED_SCRIPT = """
import sys
import torch
from guide_mega.rollout.engine import SamplingParams
from guide_mega.rollout.sglang_colocated import SGLangColocatedEngine

model_dir, weights_path, output_path = sys.argv[1:]
engine = SGLangColocatedEngine(model_dir, mem_fraction_static=0.3, bucket_bytes=1 << 20, dtype="float32",
                               device="cpu", enable_memory_saver=False, max_total_tokens=4096)
prompts = torch.load(weights_path)["prompts"]
engine.update_weights(iter(torch.load(weights_path)["weights"]))
completions = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
torch.save([(c.response_ids, c.logprobs) for c in completions], output_path)
engine.close()
"""


def test_colocated_engine_updates_weights_in_buckets(tiny_model_dir, smollm2_tokenizer, prompt_ids, tmp_path):
    """The in-process sglang.Engine, run by the SGLang environment's Python (the memory saver needs a GPU)."""
    venv = sglang_venv()
    weights = new_weights(smollm2_tokenizer, 3)
    torch.save({"weights": weights, "prompts": prompt_ids}, tmp_path / "weights.pt")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}:{venv / 'stubs'}", "SGLANG_USE_CPU_ENGINE": "1"}
    command = [str(venv / "bin" / "python"), "-c", COLOCATED_SCRIPT, str(tiny_model_dir)]
    subprocess.run([*command, str(tmp_path / "weights.pt"), str(tmp_path / "out.pt")], env=env, check=True, timeout=600)
    reference = HFEngine(tiny_model_dir)
    reference.update_weights(iter(weights))
    expected = reference.generate(prompt_ids, SamplingParams(temperature=0, max_new_tokens=8))
    for ours, (ids, logprobs) in zip(expected, torch.load(tmp_path / "out.pt"), strict=True):
        assert ids == ours.response_ids
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ours.logprobs), atol=LOGPROB_ATOL, rtol=0)
