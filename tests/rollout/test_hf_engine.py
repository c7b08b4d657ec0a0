"""HFEngine on a tiny random Llama: logprobs equal a teacher-forced forward, stops, batching, weight updates."""

from dataclasses import replace

import pytest
import torch

from guide_mega.rollout.engine import Completion, SamplingParams, bucket_named_tensors
from guide_mega.rollout.hf_engine import HFEngine

from .conftest import make_tiny_llama

# fp32 on CPU: generate (KV cache, left padding) and a plain forward differ only by summation order.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(2)
    return HFEngine(tiny_model_dir, batch_size=8)


def teacher_forced_logits(model, prompt, response):
    """[R, V] logits that predicted each response token, from one unpadded forward over prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(response) - 1]


def check_logprobs(model, prompt, completion, temperature):
    logits_RV = teacher_forced_logits(model, prompt, completion.response_ids)
    expected_R = torch.log_softmax(logits_RV / temperature, dim=-1).gather(
        1, torch.tensor(completion.response_ids)[:, None]
    )[:, 0]
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected_R, atol=LOGPROB_ATOL, rtol=0)
    return logits_RV


def test_greedy_tokens_and_logprobs_match_a_forward_pass(engine, prompt_ids):
    completions = engine.generate(prompt_ids, SamplingParams(temperature=0, max_new_tokens=12))
    assert len(completions) == len(prompt_ids)
    for prompt, completion in zip(prompt_ids, completions, strict=True):
        assert completion.finish_reason == "length" and len(completion.response_ids) == 12
        logits_RV = check_logprobs(engine.model, prompt, completion, temperature=1.0)
        assert completion.response_ids == logits_RV.argmax(-1).tolist()
        assert completion.text == engine.tokenizer.decode(completion.response_ids, skip_special_tokens=True)


def test_sampled_logprobs_are_temperature_scaled_and_untruncated(engine, prompt_ids):
    sampling = SamplingParams(temperature=0.7, top_k=5, top_p=0.95, max_new_tokens=10, seed=3)
    completions = engine.generate(prompt_ids, sampling)
    for prompt, completion in zip(prompt_ids, completions, strict=True):
        logits_RV = check_logprobs(engine.model, prompt, completion, temperature=0.7)
        top5_RK = logits_RV.topk(5, dim=-1).indices
        assert all(token in top5_RK[step] for step, token in enumerate(completion.response_ids))
    again = engine.generate(prompt_ids, sampling)
    assert [c.response_ids for c in again] == [c.response_ids for c in completions]


def test_batching_does_not_change_results(tiny_model_dir, prompt_ids):
    sampling = SamplingParams(temperature=0, max_new_tokens=6)
    requests = prompt_ids + prompt_ids[:3]
    one_by_one = HFEngine(tiny_model_dir, batch_size=1).generate(requests, sampling)
    batched = HFEngine(tiny_model_dir, batch_size=3).generate(requests, sampling)
    assert [c.response_ids for c in batched] == [c.response_ids for c in one_by_one]
    for left, right in zip(batched, one_by_one, strict=True):
        torch.testing.assert_close(torch.tensor(left.logprobs), torch.tensor(right.logprobs), atol=LOGPROB_ATOL, rtol=0)


def test_repeated_prompts_share_a_prefill_and_finished_rows_leave_the_batch(engine, prompt_ids):
    """Samples of one prompt start from a copied cache row, and sequences that stop early are dropped from the
    batch: every surviving row must still continue its own sequence (logprobs equal a teacher-forced forward)."""
    order = (2, 0, 2, 3, 0, 1, 2, 3, 1, 0)
    requests = [prompt_ids[index] for index in order]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    alone = [engine.generate([prompt], greedy)[0].response_ids for prompt in prompt_ids]
    stops = (alone[0][2], alone[2][5])
    cut = [engine.generate([prompt], replace(greedy, stop_token_ids=stops))[0].response_ids for prompt in prompt_ids]
    assert len({len(ids) for ids in cut}) > 1, "the test needs sequences that stop at different steps"
    batched = engine.generate(requests, replace(greedy, stop_token_ids=stops))
    assert [c.response_ids for c in batched] == [cut[index] for index in order]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    first = engine.generate(requests, sampling)
    sampling = replace(sampling, stop_token_ids=tuple(c.response_ids[2] for c in first[::2]))
    completions = engine.generate(requests, sampling)
    assert len({len(c.response_ids) for c in completions}) > 1
    for prompt, completion in zip(requests, completions, strict=True):
        check_logprobs(engine.model, prompt, completion, temperature=1.0)
        assert (completion.finish_reason == "stop") == (completion.response_ids[-1] in sampling.stop_token_ids)


def test_stop_token_and_stop_string_end_each_sequence_where_it_completes(engine, prompt_ids):
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    reference = engine.generate(prompt_ids, greedy)
    stop_token = reference[0].response_ids[4]
    stopped = engine.generate(
        prompt_ids, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_token,))
    )
    for full, completion in zip(reference, stopped, strict=True):
        if stop_token in full.response_ids:
            cut = full.response_ids.index(stop_token) + 1
            assert (completion.response_ids, completion.finish_reason) == (full.response_ids[:cut], "stop")
            assert completion.logprobs == pytest.approx(full.logprobs[:cut], abs=LOGPROB_ATOL)
        else:
            assert completion.response_ids == full.response_ids and completion.finish_reason == "length"
    ignoring = engine.generate(
        prompt_ids[:1], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_token,), ignore_eos=True)
    )[0]
    assert (ignoring.response_ids, ignoring.finish_reason) == (reference[0].response_ids, "length")
    stop_text = engine.tokenizer.decode(reference[1].response_ids[2:4])
    by_string = engine.generate(prompt_ids[1:2], SamplingParams(temperature=0, max_new_tokens=12, stop=(stop_text,)))[0]
    assert by_string.finish_reason == "stop" and stop_text in by_string.text
    assert stop_text not in engine.tokenizer.decode(by_string.response_ids[:-1])
    assert by_string.response_ids == reference[1].response_ids[: len(by_string.response_ids)]


def test_update_weights_in_place_matches_a_fresh_engine(tiny_model_dir, smollm2_tokenizer, prompt_ids, tmp_path):
    other = make_tiny_llama(smollm2_tokenizer, seed=1)
    other.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    expected = HFEngine(tmp_path).generate(prompt_ids, greedy)
    engine = HFEngine(tiny_model_dir)
    assert [c.response_ids for c in engine.generate(prompt_ids, greedy)] != [c.response_ids for c in expected]
    for bucket in bucket_named_tensors(iter(other.state_dict().items()), bucket_bytes=1 << 20):
        engine.update_weights(bucket)
    updated = engine.generate(prompt_ids, greedy)
    assert [c.response_ids for c in updated] == [c.response_ids for c in expected]
    for left, right in zip(updated, expected, strict=True):
        torch.testing.assert_close(torch.tensor(left.logprobs), torch.tensor(right.logprobs), atol=LOGPROB_ATOL, rtol=0)
    engine.update_weights([("model.norm.weight", torch.full((64,), 0.5, dtype=torch.bfloat16))])
    assert engine.model.model.norm.weight.dtype == torch.float32
    assert torch.equal(engine.model.model.norm.weight, torch.full((64,), 0.5))
    with pytest.raises(KeyError, match="'model.nope.weight' is not a parameter"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(3,\\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_sleep_wake_close(engine, prompt_ids):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompt_ids, SamplingParams(max_new_tokens=2))
    engine.wake()
    assert len(engine.generate(prompt_ids[:1], SamplingParams(max_new_tokens=2))[0].response_ids) == 2


def test_bucketing_and_record_checks():
    named = [(f"w{index}", torch.zeros(size)) for index, size in enumerate([3, 3, 10, 1])]
    buckets = list(bucket_named_tensors(named, bucket_bytes=24))
    assert [[name for name, _ in bucket] for bucket in buckets] == [["w0", "w1"], ["w2"], ["w3"]]
    with pytest.raises(ValueError, match="2 logprobs for 1 tokens"):
        Completion(response_ids=[1], logprobs=[0.0, 0.0], finish_reason="stop")
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        SamplingParams(top_p=0.0)


def test_per_request_seeds_make_samples_independent_of_batching_and_neighbours(tiny_model_dir, prompt_ids):
    """A request with its own seed samples the same tokens alone, in another batch size, beside other requests,
    or at another position; the draws follow the tempered, truncated distribution (top-k holds)."""
    sampling = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=1)
    requests = [prompt_ids[0], prompt_ids[1], prompt_ids[0], prompt_ids[2]]
    seeds = [11, 12, 13, 14]
    together = HFEngine(tiny_model_dir, batch_size=4).generate(requests, sampling, seeds=seeds)
    one_by_one = HFEngine(tiny_model_dir, batch_size=1)
    reordered = one_by_one.generate(requests[::-1], sampling, seeds=seeds[::-1])[::-1]
    assert [c.response_ids for c in reordered] == [c.response_ids for c in together]
    assert together[0].response_ids != together[2].response_ids  # same prompt, own seed, own sample
    for prompt, completion in zip(requests, together, strict=True):
        logits_RV = check_logprobs(one_by_one.model, prompt, completion, temperature=1.0)
        top20_RK = logits_RV.topk(20, dim=-1).indices
        assert all(token in top20_RK[step] for step, token in enumerate(completion.response_ids))
    with pytest.raises(ValueError, match="2 seeds for 4 requests"):
        one_by_one.generate(requests, sampling, seeds=seeds[:2])


def test_seeded_sampling_draws_from_the_model_distribution():
    """Gumbel-max with per-row generators samples each token with its softmax probability (chi-square-free check:
    empirical frequencies within 4 standard errors over 20k draws of a fixed 5-way distribution)."""
    from guide_mega.rollout.hf_decode import sample_next_tokens

    probs_V = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits_AV = probs_V.log().expand(20000, -1).clone()
    generators = [torch.Generator().manual_seed(seed) for seed in range(20000)]
    tokens_A, logprobs_A = sample_next_tokens(logits_AV, SamplingParams(temperature=1.0), generators=generators)
    counts_V = torch.bincount(tokens_A, minlength=5).double() / 20000
    stderr_V = (probs_V.double() * (1 - probs_V.double()) / 20000).sqrt()
    assert ((counts_V - probs_V.double()).abs() <= 4 * stderr_V).all(), counts_V
    torch.testing.assert_close(logprobs_A, probs_V.log()[tokens_A])


def test_requests_are_spread_by_expected_tokens_and_engines_sit_on_group_leaders():
    from guide_mega.rollout.fleet import EngineLayout, split_by_expected_tokens

    shards = split_by_expected_tokens([10, 1, 1, 1, 9, 2], 2)
    assert sorted(i for shard in shards for i in shard) == list(range(6))
    assert sorted(sum([10, 1, 1, 1, 9, 2][i] for i in shard) for shard in shards) == [12, 12]
    assert all(shard == sorted(shard) for shard in shards)
    assert EngineLayout(16, 8, 4).owners == [0, 4, 8, 12]
    assert EngineLayout(4, 4, 1).owners == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="must divide the 8 ranks per node"):
        EngineLayout(16, 8, 3)


def test_check_weights_passes_after_a_push_and_names_a_tensor_that_did_not_arrive(tiny_model_dir):
    from guide_mega.rollout.engine import WeightSyncError

    engine = HFEngine(tiny_model_dir, batch_size=2)
    norm = engine.model.model.norm.weight.detach().clone() + 0.5
    engine.update_weights([("model.norm.weight", norm)])
    engine.check_weights(
        [("model.norm.weight", norm), ("model.embed_tokens.weight", engine.model.model.embed_tokens.weight)]
    )
    with pytest.raises(WeightSyncError, match="HFEngine holds other values of model.norm.weight"):
        engine.check_weights([("model.norm.weight", norm + 1.0)])
