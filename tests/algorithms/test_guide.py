"""Guide's unsolved-group detection, hinted prompts, merging and hint metrics."""

from dataclasses import replace

import pytest
import torch

from guide_mega.algorithms.advantages import group_advantages_reference
from guide_mega.algorithms.filtering import keep_groups_with_variance
from guide_mega.algorithms.guide import (
    escalation_plan,
    find_unsolved_groups,
    guide_metrics,
    hint_level_updates,
    hint_reliance,
    hint_reliance_by_level,
    hint_teacher_loss,
    hint_teacher_sequences,
    hinted_prompt,
    level_metrics,
    merge_guided_groups,
    next_hint_level,
    plan_hints,
    trainable_group_yield,
    unsolved_mask,
)
from guide_mega.types import Prompt, Rollout, RolloutGroup

PLAIN_IDS = [1, 2, 3]
HINTED_IDS = [1, 2, 9, 9, 3]


def _group(prompt_id, correct, *, hint="use the subtotals", guided=False):
    prompt = Prompt(id=prompt_id, prompt=f"problem {prompt_id}", answer="7", hint=hint)
    sampled = HINTED_IDS if guided else PLAIN_IDS
    rollouts = [
        Rollout(prompt_id=prompt_id, sampled_prompt_ids=sampled, train_prompt_ids=sampled, response_ids=[5, 6],
                reward=float(ok), correct=ok, is_guided=guided)
        for ok in correct
    ]  # fmt: skip
    return RolloutGroup(prompt=prompt, rollouts=rollouts, is_guided=guided)


def _rewards_and_ids(groups):
    rewards = [r.reward for g in groups for r in g.rollouts]
    ids = [i for i, g in enumerate(groups) for _ in g.rollouts]
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids)


def test_unsolved_threshold():
    rates_G = torch.tensor([0.0, 0.125, 0.5, 1.0])
    assert unsolved_mask(rates_G, threshold=0.0).tolist() == [True, False, False, False]
    assert unsolved_mask(rates_G, threshold=0.125).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="threshold"):
        unsolved_mask(rates_G, threshold=1.0)


def test_find_unsolved_groups_all_unsolved_and_guided_excluded():
    groups = [_group("a", [False] * 4), _group("b", [False] * 4), _group("c", [False] * 4, guided=True)]
    assert find_unsolved_groups(groups) == [0, 1]
    groups = [_group("a", [True, False, False, False]), _group("b", [False] * 4)]
    assert find_unsolved_groups(groups, threshold=0.0) == [1]
    assert find_unsolved_groups(groups, threshold=0.25) == [0, 1]


def test_hinted_prompt_text_chat_and_precedence():
    text = Prompt(id="t", prompt="2 cats?", answer="8", hint="a cat has 4 legs")
    assert hinted_prompt(text) == "2 cats?\nHint: a cat has 4 legs"
    assert hinted_prompt(text, template="[{hint}] {prompt}") == "[a cat has 4 legs] 2 cats?"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 cats?"}]
    chat = Prompt(id="c", prompt=messages, answer="8", hint="a cat has 4 legs")
    hinted = hinted_prompt(chat)
    assert hinted[0] == messages[0] and hinted[1]["content"] == "2 cats?\nHint: a cat has 4 legs"
    assert messages[1]["content"] == "2 cats?"  # the hint-free prompt is left untouched
    given = Prompt(id="g", prompt="p", answer="1", hint="h", hinted_prompt="full hinted text")
    assert hinted_prompt(given) == "full hinted text"
    with pytest.raises(ValueError, match="no hint"):
        hinted_prompt(Prompt(id="n", prompt="p", answer="1"))


def test_plan_hints_counts_prompts_without_hint():
    groups = [_group("a", [False] * 2), _group("b", [False] * 2, hint=None), _group("c", [True, False])]
    plan = plan_hints(groups, find_unsolved_groups(groups))
    assert plan.group_indices == [0] and plan.without_hint == [1]
    assert plan.prompts == ["problem a\nHint: use the subtotals"]


def test_merge_replace_trains_guided_rollouts_under_hint_free_prompt():
    groups = [_group("a", [False] * 4), _group("b", [True, False, True, False])]
    guided = {0: _group("a", [True, False, False, False], guided=True)}
    merged, dropped = merge_guided_groups(groups, guided, mode="replace")
    assert merged[1] is groups[1] and dropped == []
    assert len(merged[0].rollouts) == 4 and merged[0].is_guided
    for rollout in merged[0].rollouts:
        assert rollout.is_guided
        assert rollout.sampled_prompt_ids == HINTED_IDS  # old logprobs: the context it was sampled in
        assert rollout.train_prompt_ids == PLAIN_IDS  # current policy: the hint-free context
    rewards, ids = _rewards_and_ids(merged)
    advantages = group_advantages_reference(rewards, ids, unbiased_std=False, eps=0.0)
    torch.testing.assert_close(advantages[:4], torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64) / 3**0.5)


def test_merge_pool_normalises_over_failed_and_guided_samples():
    groups = [_group("a", [False] * 4)]
    merged, _ = merge_guided_groups(groups, {0: _group("a", [True, True, False, False], guided=True)}, mode="pool")
    assert len(merged[0].rollouts) == 8
    assert [r.is_guided for r in merged[0].rollouts] == [False] * 4 + [True] * 4
    rewards, ids = _rewards_and_ids(merged)
    advantages = group_advantages_reference(rewards, ids, unbiased_std=False, eps=0.0)
    # mean 0.25, population std sqrt(0.1875)
    expected = (torch.tensor([0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float64) - 0.25) / 0.1875**0.5
    torch.testing.assert_close(advantages, expected)


def test_merge_rejects_mismatched_prompt():
    with pytest.raises(ValueError, match="merged into"):
        merge_guided_groups([_group("a", [False])], {0: _group("b", [True], guided=True)})


def test_no_unsolved_group_reduces_exactly_to_grpo():
    groups = [_group("a", [True, False, True]), _group("b", [False, True, True])]
    unsolved = find_unsolved_groups(groups)
    assert unsolved == []
    plan = plan_hints(groups, unsolved)
    merged, dropped = merge_guided_groups(groups, {}, mode="replace")
    assert merged == groups and dropped == [] and plan.group_indices == []
    assert not any(r.is_guided for g in merged for r in g.rollouts)


def test_keep_groups_with_variance_counts_what_it_drops():
    groups = [_group("a", [False] * 2), _group("b", [True, False]), _group("c", [True, True])]
    kept, metrics = keep_groups_with_variance(groups)
    assert [g.prompt.id for g in kept] == ["b"]
    assert metrics.as_dict() == {"filter/num_groups_dropped": 2.0}


def test_equal_reward_guided_groups_are_dropped_before_merging_in_replace_mode():
    """replace: an all-wrong (or all-right) guided group alone has no signal; the failed group stays."""
    groups = [_group("a", [False] * 4), _group("b", [False] * 4)]
    guided = {0: _group("a", [False] * 4, guided=True), 1: _group("b", [True, False, False, False], guided=True)}
    merged, dropped = merge_guided_groups(groups, guided, mode="replace", drop_equal_rewards=True)
    assert dropped == [0] and merged[0] is groups[0] and merged[1].is_guided


def test_pool_mode_keeps_an_all_correct_guided_wave_beside_an_all_wrong_first_wave():
    """pool: the filter looks at the merged group; [0,0,0,0,1,1,1,1] is a strong signal, not a zero-variance one."""
    groups = [_group("a", [False] * 4), _group("b", [False] * 4)]
    guided = {0: _group("a", [True] * 4, guided=True), 1: _group("b", [False] * 4, guided=True)}
    merged, dropped = merge_guided_groups(groups, guided, mode="pool", drop_equal_rewards=True)
    assert dropped == [1] and merged[1] is groups[1]
    assert merged[0].rewards == [0.0] * 4 + [1.0] * 4


def test_hint_reliance_hand_computed():
    hinted_T = torch.tensor([-0.1, -0.2, -0.5, -1.0, -1.0])
    plain_T = torch.tensor([-1.1, -1.2, -0.5, -2.0, -1.5])
    seq_ids_T = torch.tensor([0, 0, 1, 2, 2])
    guided_S = torch.tensor([True, False, True])
    metrics = hint_reliance(hinted_T, plain_T, seq_ids_T, guided_S)
    assert metrics["guide/hint_reliance"].item() == pytest.approx((2.0 + 1.5) / 2)
    assert metrics["guide/hint_reliance_per_token"].item() == pytest.approx((1.0 + 0.75) / 2)
    none = hint_reliance(hinted_T, plain_T, seq_ids_T, torch.zeros(3, dtype=torch.bool))
    assert none["guide/hint_reliance"].item() == 0.0


def test_hint_reliance_by_level_matches_a_float64_loop_on_random_sequences():
    generator = torch.Generator().manual_seed(3)
    lengths = [3, 0, 5, 1, 4, 2, 6, 0, 2, 3]  # two empty sequences, one of them guided
    hint_level_S = torch.tensor([-1, 2, 0, 2, -1, 1, 0, -1, 2, 0])
    seq_ids_T = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    hinted_T, plain_T = -torch.rand(2, seq_ids_T.numel(), generator=generator, dtype=torch.float64)
    expected = [[0.0, 0.0] for _ in range(4)]
    start = 0
    for length, level in zip(lengths, hint_level_S.tolist(), strict=True):
        if level >= 0 and length:
            expected[level][0] += sum(hinted_T[start + t].item() - plain_T[start + t].item() for t in range(length))
            expected[level][1] += 1
        start += length
    sums_L2 = hint_reliance_by_level(hinted_T, plain_T, seq_ids_T, hint_level_S, num_levels=4)
    assert sums_L2.dtype == torch.float64 and sums_L2[:, 1].tolist() == [3.0, 1.0, 2.0, 0.0]
    torch.testing.assert_close(sums_L2, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    overall = hint_reliance(hinted_T, plain_T, seq_ids_T, hint_level_S >= 0)["guide/hint_reliance"]
    assert overall.item() == pytest.approx((sums_L2[:, 0].sum() / sums_L2[:, 1].sum()).item(), rel=1e-6)
    with pytest.raises(ValueError, match="hint level 2 is not below the 2 levels"):
        hint_reliance_by_level(hinted_T, plain_T, seq_ids_T, hint_level_S, num_levels=2)


def test_guide_metrics_counts():
    groups = [_group("a", [False] * 2), _group("b", [False] * 2, hint=None), _group("c", [True, False])]
    unsolved = find_unsolved_groups(groups)
    plan = plan_hints(groups, unsolved)
    guided = {0: _group("a", [True, False], guided=True)}
    metrics = guide_metrics(groups, unsolved, plan, guided, dropped=[]).as_dict()
    assert metrics["guide/num_unsolved_groups"] == 2
    assert metrics["guide/num_unsolved_without_hint"] == 1
    assert metrics["guide/guided_groups_solved"] == 1
    assert metrics["guide/guided_success_rate"] == pytest.approx(0.5)


GRADED = ["legs per animal", "subtotals"]


def _graded_group(prompt_id, correct, *, hint=GRADED):
    group = _group(prompt_id, correct)
    return RolloutGroup(prompt=replace(group.prompt, hint=list(hint)), rollouts=group.rollouts)


def test_hinted_prompt_levels_and_the_prompts_own_template():
    prompt = Prompt(id="g", prompt="2 cats?", answer="8", hint=GRADED)
    assert prompt.num_hint_levels == 2
    assert hinted_prompt(prompt, level=0) == "2 cats?\nHint: legs per animal"
    assert hinted_prompt(prompt) == "2 cats?\nHint: subtotals"  # no level: the strongest
    own = replace(prompt, hint_template="Q: 2 cats? ({hint}) Answer:")
    assert hinted_prompt(own, template="{prompt} {hint}", level=1) == "Q: 2 cats? (subtotals) Answer:"
    with pytest.raises(ValueError, match="has 2 hint levels, asked for level 2"):
        hinted_prompt(prompt, level=2)


def test_plan_starts_each_problem_at_its_level_and_fixed_hints_at_the_strongest():
    groups = [_graded_group("a", [False] * 2), _graded_group("b", [False] * 2), _group("c", [False] * 2)]
    plan = plan_hints(groups, [0, 1, 2], levels={"b": 1, "c": 5})  # c has one hint: its level stays 0
    assert plan.levels == [0, 1, 0]
    assert plan.prompts == [
        "problem a\nHint: legs per animal",
        "problem b\nHint: subtotals",
        "problem c\nHint: use the subtotals",
    ]
    assert plan_hints(groups, [0, 1], levels=None).levels == [1, 1]


def test_escalation_plan_steps_up_only_failed_waves_with_a_stronger_hint():
    groups = [_graded_group("a", [False] * 2), _graded_group("b", [False] * 2), _graded_group("c", [False] * 2)]
    plan = plan_hints(groups, [0, 1, 2], levels={"c": 1})
    waves = [_group("a", [False, False], guided=True), _group("b", [True, False], guided=True),
             _group("c", [False, False], guided=True)]  # fmt: skip
    up = escalation_plan(groups, plan, waves)
    assert up.group_indices == [0] and up.levels == [1] and up.prompts == ["problem a\nHint: subtotals"]


@pytest.mark.parametrize(
    ("level", "success", "expected"),
    [(0, 0.0, 1), (1, 0.0, 2), (2, 0.0, 2), (1, 0.5, 1), (1, 0.25, 1), (1, 0.75, 1), (1, 1.0, 0), (0, 1.0, 0)],
)
def test_next_hint_level_aims_at_half_success(level, success, expected):
    assert next_hint_level(level, num_levels=3, guided_success=success, target=0.5, tolerance=0.25) == expected


def test_hint_level_updates_escalate_failures_and_lower_problems_solved_without_a_hint():
    groups = [_graded_group("a", [False] * 4), _graded_group("b", [True, False, False, False]),
              _graded_group("c", [False] * 4), _group("d", [False] * 4, hint=None),
              _group("e", [True] * 4, hint=None)]  # fmt: skip
    levels = {"b": 1, "c": 1, "e": 1}  # e: its hints were written by the policy, so its prompt here has none
    unsolved = find_unsolved_groups(groups)
    plan = plan_hints(groups, unsolved, levels=levels)
    guided = {0: _group("a", [False] * 4, guided=True), 2: _group("c", [True] * 4, guided=True)}
    updates = hint_level_updates(groups, unsolved, plan, guided, levels=levels, target=0.5, tolerance=0.25)
    # a failed at 0 -> 1; b and e solved without a hint: 1 -> 0; c succeeded every time at 1 -> 0; d has no hint.
    assert updates == {"a": 1, "b": 0, "c": 0, "e": 0}
    assert hint_level_updates(groups, [], replace(plan, group_indices=[], levels=[]), {}, levels={},
                              target=0.5, tolerance=0.25) == {}  # fmt: skip


def test_level_metrics_and_trainable_group_yield():
    plan = plan_hints([_graded_group("a", [False] * 2), _graded_group("b", [False] * 2)], [0, 1], levels={"b": 1})
    waves = [_group("a", [True, False, False, False], guided=True), _group("b", [True, True], guided=True)]
    metrics = level_metrics(plan, waves).as_dict()
    assert metrics == {"guide/level0_groups": 1.0, "guide/level1_groups": 1.0,
                       "guide/level0_success_rate": 0.25, "guide/level1_success_rate": 1.0}  # fmt: skip
    both = (level_metrics(plan, waves) + level_metrics(replace(plan, levels=[0, 0]), waves)).as_dict()
    assert both["guide/level0_groups"] == 3.0 and both["guide/level0_success_rate"] == pytest.approx(4 / 10)
    groups = [_group("a", [True, False]), _group("b", [True, True]), _group("c", [False, True])]
    assert trainable_group_yield(groups, generated_tokens=500) == {"guide/trainable_groups_per_1k_tokens": 4.0}


def test_hint_teacher_sequences_point_hint_free_samples_at_a_guided_sample_of_their_group():
    group_ids_S = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    is_guided_S = torch.tensor([False, False, True, True, False, False, False, True])
    teacher_S = hint_teacher_sequences(group_ids_S, is_guided_S)
    assert teacher_S.tolist() == [2, 2, -1, -1, -1, -1, 7, -1]  # group 1 has no guided sample: no teacher


def test_hint_teacher_gradient_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(19)
    logits_TV = torch.randn(6, 11, generator=generator, requires_grad=True)
    teacher_logits_TV = torch.randn(6, 11, generator=generator, requires_grad=True)
    tokens_T = torch.randint(0, 11, (6,), generator=generator)
    picked = torch.arange(6), tokens_T
    loss = hint_teacher_loss(logits_TV.log_softmax(-1)[picked], teacher_logits_TV.log_softmax(-1)[picked]).sum()
    loss.backward()
    # d/dz 1/2 (log p_o - log q_o)^2 = (log p_o - log q_o) (onehot(o) - p), in float64.
    logp_TV, logq_TV = logits_TV.detach().double().log_softmax(-1), teacher_logits_TV.detach().double().log_softmax(-1)
    onehot_TV = torch.nn.functional.one_hot(tokens_T, 11).double()
    expected_TV = (logp_TV - logq_TV)[picked][:, None] * (onehot_TV - logp_TV.exp())
    torch.testing.assert_close(logits_TV.grad.double(), expected_TV, rtol=1e-5, atol=1e-6)
    assert teacher_logits_TV.grad is None or not teacher_logits_TV.grad.any()  # the teacher is a stop-gradient


def test_hint_teacher_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Averaged over the sampled token o ~ pi(.|q) exactly (every token, weighted by its probability), the
    sampled-token gradient is the full-vocabulary gradient of KL(pi(.|q) || pi(.|q,h)), in float64."""
    generator = torch.Generator().manual_seed(7)
    logits_V = torch.randn(13, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_V = torch.randn(13, generator=generator, dtype=torch.float64)
    logp_V, logq_V = logits_V.log_softmax(-1), teacher_V.log_softmax(-1)
    (kl_grad_V,) = torch.autograd.grad((logp_V.exp() * (logp_V - logq_V)).sum(), logits_V, retain_graph=True)
    expected_V = torch.zeros(13, dtype=torch.float64)
    for token in range(13):
        (grad_V,) = torch.autograd.grad(hint_teacher_loss(logp_V[token], logq_V[token]), logits_V, retain_graph=True)
        expected_V += logp_V[token].exp().detach() * grad_V
    torch.testing.assert_close(expected_V, kl_grad_V, rtol=1e-10, atol=1e-12)
