"""HFEngine's continuous batching on a tiny random Llama: results independent of the batch width, slots refilled
while requests wait, one prefill per distinct prompt, and slot-cache compaction that changes nothing."""

from dataclasses import replace

import pytest
import torch

from guide_mega.rollout import hf_decode
from guide_mega.rollout.engine import SamplingParams
from guide_mega.rollout.hf_decode import sample_next_tokens
from guide_mega.rollout.hf_engine import HFEngine

# Another batch width changes the GEMMs' blocking and so the logits' last bits (the tiny model's logits are large:
# ~3e-5 seen); samples stay the same.
LOGPROB_ATOL = 1e-4
SEEDS = [101, 102, 103, 104, 105, 106, 107]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(2)
    return HFEngine(tiny_model_dir, batch_size=8)


@pytest.fixture(scope="module")
def requests(prompt_ids):
    """Seven requests: repeated prompts (out of order) and a one-token prompt (no prefix to prefill)."""
    return [prompt_ids[0], prompt_ids[1], prompt_ids[0], prompt_ids[2], prompt_ids[3], [prompt_ids[1][-1]],
            prompt_ids[0]]  # fmt: skip


@pytest.fixture(scope="module")
def sampling(engine, requests):
    """Sampling whose stop tokens end the requests at different lengths (checked)."""
    free = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=10, ignore_eos=True)
    first = engine.generate(requests, free, seeds=SEEDS)
    stopping = replace(free, ignore_eos=False, stop_token_ids=(first[0].response_ids[3], first[3].response_ids[6]))
    lengths = [len(completion.response_ids) for completion in engine.generate(requests, stopping, seeds=SEEDS)]
    assert len(set(lengths)) > 2, f"the tests need sequences that stop at different steps, got lengths {lengths}"
    return stopping


def reference_decode(model, prompt, sampling, *, seed, stop_ids):
    """One request alone, without a KV cache: every step a full forward over prompt + response so far."""
    generator = torch.Generator().manual_seed(seed)
    ids, logprobs = list(prompt), []
    while len(logprobs) < sampling.max_new_tokens:
        with torch.no_grad():
            logits_1V = model(torch.tensor([ids])).logits[:, -1]
        token_1, logprob_1 = sample_next_tokens(logits_1V, sampling, generators=[generator])
        ids.append(int(token_1))
        logprobs.append(float(logprob_1))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt) :], logprobs


@pytest.mark.parametrize("width", [1, 3, 8])
def test_samples_and_logprobs_do_not_depend_on_the_batch_width(tiny_model_dir, engine, requests, sampling, width):
    """Every width gives each request the tokens and logprobs of decoding it alone without a cache."""
    completions = HFEngine(tiny_model_dir, batch_size=width).generate(requests, sampling, seeds=SEEDS)
    for prompt, seed, completion in zip(requests, SEEDS, completions, strict=True):
        ids, logprobs = reference_decode(
            engine.model, prompt, sampling, seed=seed, stop_ids=set(sampling.stop_token_ids) | engine.eos_ids
        )
        assert completion.response_ids == ids
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
    if width != 8:
        widest = engine.generate(requests, sampling, seeds=SEEDS)
        assert [c.response_ids for c in completions] == [c.response_ids for c in widest]
        for narrow, wide in zip(completions, widest, strict=True):
            torch.testing.assert_close(
                torch.tensor(narrow.logprobs), torch.tensor(wide.logprobs), atol=LOGPROB_ATOL, rtol=0
            )


def expected_rows_per_step(lengths, width):
    """Rows of each decode step when a finished request's slot goes to the next waiting one, in request order."""
    waiting, running, rows = list(lengths), [], []
    while waiting or running:
        while len(running) < width and waiting:
            running.append(waiting.pop(0))
        rows.append(len(running))
        running = [steps - 1 for steps in running if steps > 1]
    return rows


def test_finished_rows_hand_their_slot_to_waiting_requests_and_prompts_prefill_once(tiny_model_dir, requests, sampling):
    engine = HFEngine(tiny_model_dir, batch_size=3)
    decode_rows, prefilled = [], []

    def record(module, args, kwargs, output):
        mask = kwargs["attention_mask"]
        (decode_rows if mask.dim() == 4 else prefilled).append(mask.shape[0])

    hook = engine.model.register_forward_hook(record, with_kwargs=True)
    try:
        completions = engine.generate(requests, sampling, seeds=SEEDS)
    finally:
        hook.remove()
    lengths = [len(completion.response_ids) for completion in completions]
    assert decode_rows == expected_rows_per_step(lengths, 3)
    assert decode_rows[:4] == [3, 3, 3, 3]  # the queue refills the batch after the first sequences stop
    # Four distinct prompts with a prefix (the one-token prompt has none), each prefilled exactly once, when its
    # first request gets a slot: prompts 0 and 1 together, then 2, then 3.
    assert prefilled == [2, 1, 1]


def test_cache_compaction_changes_nothing(tiny_model_dir, engine, requests, sampling, monkeypatch):
    """One spare column compacts the slot cache every step; the results equal the default's."""
    expected = engine.generate(requests, sampling, seeds=SEEDS)
    monkeypatch.setattr(hf_decode, "_CACHE_SLACK", 1)
    compacted = HFEngine(tiny_model_dir, batch_size=3).generate(requests, sampling, seeds=SEEDS)
    assert [c.response_ids for c in compacted] == [c.response_ids for c in expected]
    assert [c.finish_reason for c in compacted] == [c.finish_reason for c in expected]
    for left, right in zip(compacted, expected, strict=True):
        torch.testing.assert_close(torch.tensor(left.logprobs), torch.tensor(right.logprobs), atol=LOGPROB_ATOL, rtol=0)
