"""Logprobs of response tokens from the Megatron policy equal transformers' on the same weights (fp32)."""

import pytest
from tiny_models import hf_response_logprobs, make_train_batch
from transformers import AutoModelForCausalLM

FAMILIES = ("llama", "qwen2", "qwen3")
# fp32 end to end; both sides sum the same products in different orders.
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def hf_logprobs(tiny_checkpoints):
    """family -> (train-context logprobs, sampled-context logprobs) [T] from transformers."""
    batch = make_train_batch()
    results = {}
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).eval()
        results[family] = (hf_response_logprobs(model, batch), hf_response_logprobs(model, batch, context="sampled"))
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_logprobs_match_transformers(family, single_process_reference, hf_logprobs):
    reference = single_process_reference[family]
    hf_train_T, hf_sampled_T = hf_logprobs[family]
    assert (reference["logprobs_train"] - hf_train_T).abs().max() <= MAX_ABS_DIFF
    assert (reference["logprobs_sampled"] - hf_sampled_T).abs().max() <= MAX_ABS_DIFF


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_logprobs_match_transformers(family, layout_results, hf_logprobs):
    """TP=2, PP=2, TP=2 x PP=2 and DP=2 (the layout fixture), every family."""
    results = layout_results.load(family)
    hf_train_T, hf_sampled_T = hf_logprobs[family]
    diff_train = (results["logprobs_train"] - hf_train_T).abs().max()
    diff_sampled = (results["logprobs_sampled"] - hf_sampled_T).abs().max()
    assert diff_train <= MAX_ABS_DIFF, f"{layout_results.name} {family}: train-context max |diff| {diff_train}"
    assert diff_sampled <= MAX_ABS_DIFF, f"{layout_results.name} {family}: sampled-context max |diff| {diff_sampled}"
