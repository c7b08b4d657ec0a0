"""The Guide train step: split-invariant loss and gradients, the right prompt contexts, and a falling loss."""

import pytest
import torch
from policy_probes import train_step
from tiny_models import hf_response_logprobs, make_train_batch
from transformers import AutoModelForCausalLM

from guide_mega.config import AlgorithmConfig

FAMILIES = ("llama", "qwen2", "qwen3")
# Gradients are fp32 sums over different partitions (micro-batches, ranks, shards); only rounding may differ.
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def _assert_same_gradients(expected: dict, actual: dict, where: str) -> None:
    assert set(expected) == set(actual), where
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=f"{where}: {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_vs_four_micro_batches_give_the_same_loss_and_gradients(family, single_process_reference):
    reference = single_process_reference[family]
    assert reference["num_micro_batches_4"] == 4
    assert reference["loss_4"] == pytest.approx(reference["loss"], rel=1e-6)
    _assert_same_gradients(reference["gradients"], reference["gradients_4"], f"{family} 1 vs 4 micro-batches")


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_layouts_give_the_single_process_loss_and_gradients(family, layout_results, single_process_reference):
    """DP=2 vs DP=1 (and TP=2, PP=2, TP=2 x PP=2): the same loss and gradients."""
    reference = single_process_reference[family]
    results = layout_results.load(family)
    # fp32 with the TP all-reduces and shared-prompt rows summing in other orders: ~1e-6 relative.
    assert results["loss"] == pytest.approx(reference["loss"], rel=5e-6), layout_results.name
    _assert_same_gradients(reference["gradients"], results["gradients"], f"{layout_results.name} {family}")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_loss_is_split_invariant_in_every_aggregation_mode(mode, tiny_checkpoints, single_process_megatron):
    from policy_probes import FOUR_MICRO_BATCH_TOKENS, loss_and_gradients, make_policy

    whole = make_policy(tiny_checkpoints["qwen2"], loss_aggregation=mode)
    split = make_policy(tiny_checkpoints["qwen2"], loss_aggregation=mode, micro_batch_tokens=FOUR_MICRO_BATCH_TOKENS)
    loss, gradients = loss_and_gradients(whole, make_train_batch())
    split_loss, split_gradients = loss_and_gradients(split, make_train_batch())
    assert split_loss == pytest.approx(loss, rel=1e-6)
    _assert_same_gradients(gradients, split_gradients, mode)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_prompt_rows_give_the_same_logprobs_loss_and_gradients(
    family, tiny_checkpoints, single_process_megatron
):
    """A group's samples in one row with one copy of the prompt vs one row per sample: same numbers, fewer tokens."""
    from policy_probes import loss_and_gradients, make_policy

    batch = make_train_batch(num_groups=3, group_size=4, guided_groups=(1,))
    shared = make_policy(tiny_checkpoints[family], share_prompts=True)
    alone = make_policy(tiny_checkpoints[family], share_prompts=False)
    seqs = list(range(batch.num_seqs))
    shared_tokens = sum(mb.num_tokens for mb in shared.runner.micro_batches(batch, seqs, "train"))
    assert shared_tokens < sum(mb.num_tokens for mb in alone.runner.micro_batches(batch, seqs, "train"))
    for context in ("train", "sampled"):
        torch.testing.assert_close(
            shared.compute_logprobs(batch, context=context),
            alone.compute_logprobs(batch, context=context),
            atol=1e-5,
            rtol=0,
        )
    loss, gradients = loss_and_gradients(shared, make_train_batch(num_groups=3, group_size=4, guided_groups=(1,)))
    alone_loss, alone_gradients = loss_and_gradients(
        alone, make_train_batch(num_groups=3, group_size=4, guided_groups=(1,))
    )
    assert loss == pytest.approx(alone_loss, rel=1e-5)
    _assert_same_gradients(alone_gradients, gradients, family)


def test_guided_samples_use_hinted_old_and_hint_free_current_logprobs(tiny_checkpoints, single_process_megatron):
    """At step start the policy is the old policy: unguided ratios are 1, guided ones pi(o|q) / pi(o|q, hint); hint
    reliance per level is the mean sequence-level log pi(o|q, hint) - log pi(o|q) of the guided samples at it."""
    from policy_probes import make_policy

    batch = make_train_batch(guided_groups=(1, 2))  # group 1 at hint level 1, group 2 at level 0
    policy = make_policy(tiny_checkpoints["llama"], lr=1e-12)
    old_logprobs_T = policy.compute_old_logprobs(batch)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    hinted_T = hf_response_logprobs(hf_model, batch, context="sampled")
    plain_T = hf_response_logprobs(hf_model, batch, context="train")
    guided_T = batch.is_guided_T
    torch.testing.assert_close(old_logprobs_T, hinted_T, atol=1e-4, rtol=0)
    assert (hinted_T - plain_T)[guided_T].abs().min() > 1e-3, "the hint must change the guided logprobs"
    metrics = train_step(policy, batch, old_logprobs_T=old_logprobs_T)
    assert metrics["actor/on_policy_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    expected_guided_ratio = torch.exp(plain_T - hinted_T)[guided_T].mean().item()
    assert metrics["actor/off_policy_ratio_mean"] == pytest.approx(expected_guided_ratio, rel=1e-4)
    assert metrics["guide/hint_reliance_per_token"] != 0.0
    seq_reliance_S = torch.zeros(batch.num_seqs).index_add(0, batch.seq_ids_T, hinted_T - plain_T)
    for level in (0, 1):
        expected = seq_reliance_S[batch.hint_level_S == level].mean().item()
        assert metrics[f"guide/level{level}_hint_reliance"] == pytest.approx(expected, abs=1e-3), level


def test_guide_grpo_steps_decrease_the_loss(tiny_checkpoints, single_process_megatron):
    """Several steps on a fixed batch (old logprobs from the first step, as in PPO epochs): the loss falls."""
    from policy_probes import make_policy

    batch = make_train_batch(guided_groups=(1,))
    policy = make_policy(tiny_checkpoints["qwen3"], lr=1e-3, mini_batches=2)
    old_logprobs_T = policy.compute_old_logprobs(batch)
    losses = []
    for _ in range(4):
        metrics = train_step(policy, batch, old_logprobs_T=old_logprobs_T)
        losses.append(metrics["loss"])
        assert metrics["actor/update_skipped"] == 0.0
        assert metrics["actor/grad_norm"] > 0.0
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert policy.optimizer_steps == 8


def test_learning_rate_follows_warmup_then_cosine_decay(tiny_checkpoints, single_process_megatron):
    from guide_mega.config import ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
    from guide_mega.training.policy import MegatronPolicy

    policy = MegatronPolicy(
        model=ModelConfig(path=str(tiny_checkpoints["qwen2"]), dtype="float32"),
        parallel=ParallelConfig(),
        algorithm=AlgorithmConfig(),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=2),
        train=TrainConfig(micro_batch_tokens=4096, prompts_per_step=1),
        total_optimizer_steps=4,
    )
    batch = make_train_batch()
    # The LR reported by a step is the one it used; the scheduler then advances by one optimizer step.
    lrs = [train_step(policy, batch)["actor/lr"] for _ in range(5)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > lrs[4] == pytest.approx(1e-4)


def test_kl_to_the_frozen_reference_starts_at_zero_and_grows(tiny_checkpoints, single_process_megatron):
    from guide_mega.config import ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
    from guide_mega.training.policy import MegatronPolicy

    policy = MegatronPolicy(
        model=ModelConfig(path=str(tiny_checkpoints["llama"]), dtype="float32"),
        parallel=ParallelConfig(),
        algorithm=AlgorithmConfig(kl_coef=0.1, kl_estimator="k3"),
        optimizer=OptimizerConfig(lr=1e-2),
        train=TrainConfig(micro_batch_tokens=4096, prompts_per_step=1),
        total_optimizer_steps=10,
    )
    batch = make_train_batch()
    first = train_step(policy, batch)
    second = train_step(policy, batch)  # old logprobs recomputed: the policy moved, the reference did not
    assert first["actor/kl"] == pytest.approx(0.0, abs=1e-7)
    assert second["actor/kl"] > 1e-6
    assert not any(param.requires_grad for param in policy.reference.module.parameters())


def test_a_bf16_policy_holds_every_parameter_in_bf16(tiny_checkpoints, single_process_megatron):
    """The local spec's norms default to fp32 whatever params_dtype says; a bf16 model must not mix dtypes."""
    from policy_probes import make_policy

    policy = make_policy(tiny_checkpoints["qwen3"], dtype="bfloat16")
    dtypes = {name: param.dtype for name, param in policy.module.named_parameters()}
    assert any("layernorm" in name or "norm" in name for name in dtypes), sorted(dtypes)
    assert {dtype for dtype in dtypes.values()} == {torch.bfloat16}, dtypes


def test_gamma_scope_global_is_one_value_per_step_and_micro_batch_follows_the_split(
    tiny_checkpoints, single_process_megatron
):
    """gamma_scope=global: one shaping gamma for the step, whatever the micro-batch split. micro_batch (the
    authors' choice): each micro-batch takes its own guided ratios' quantile, so with the whole batch in one
    micro-batch it is the global gamma, and with the guided samples spread over micro-batches it is not."""
    from policy_probes import FOUR_MICRO_BATCH_TOKENS, make_policy

    batch = make_train_batch(guided_groups=(0, 1, 2, 3))

    def first_step(**options):
        policy = make_policy(tiny_checkpoints["qwen2"], lr=1e-12, **options)
        return train_step(policy, batch)

    whole = first_step(gamma_scope="global")
    assert first_step(gamma_scope="global", micro_batch_tokens=FOUR_MICRO_BATCH_TOKENS)[
        "guide/shaping_gamma"
    ] == pytest.approx(whole["guide/shaping_gamma"], rel=1e-6)
    one = first_step(gamma_scope="micro_batch")
    assert one["guide/shaping_gamma"] == pytest.approx(whole["guide/shaping_gamma"], rel=1e-5)
    assert one["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    split = first_step(gamma_scope="micro_batch", micro_batch_tokens=FOUR_MICRO_BATCH_TOKENS)
    assert split["guide/shaping_gamma"] != pytest.approx(whole["guide/shaping_gamma"], rel=1e-3)
    assert split["loss"] != pytest.approx(whole["loss"], rel=1e-4)


def test_micro_batch_gamma_is_the_quantile_of_the_current_guided_ratios():
    from guide_mega.algorithms.losses import masked_quantile
    from guide_mega.config import GuideConfig
    from guide_mega.training.train_step import micro_batch_gamma

    generator = torch.Generator().manual_seed(3)
    logprobs_N = -torch.rand(40, generator=generator) * 3
    old_N = -torch.rand(40, generator=generator) * 3
    guided_N = torch.rand(40, generator=generator) < 0.5
    gamma = micro_batch_gamma(logprobs_N, old_N, guided_N, guide=GuideConfig(gamma_quantile=0.8))
    expected = masked_quantile(torch.exp(logprobs_N - old_N).double(), guided_N, 0.8)
    assert gamma.item() == pytest.approx(expected.item(), rel=1e-6)
