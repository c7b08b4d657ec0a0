"""Resume checkpoints: atomic, verified, and resuming continues exactly; HF exports load in transformers."""

import json

import pytest
import torch
from tiny_models import make_train_batch
from torchrun_launch import run_torchrun

from guide_mega.training.checkpoint import METADATA_FILE, list_checkpoints, prune_checkpoints
from guide_mega.training.optimizer import inner_optimizers


@pytest.mark.distributed
def test_save_kill_resume_gives_the_uninterrupted_loss(tiny_checkpoints, tmp_path):
    """DP=2 (the distributed optimizer shards Adam state): a fresh process restores step 2 and its step 3 loss
    equals the loss of the run that saved and went on."""
    root = tmp_path / "checkpoints"
    model_dir = str(tiny_checkpoints["qwen2"])
    run_torchrun(2, "checkpoint", str(tmp_path), "run", str(root), model_dir)
    run_torchrun(2, "checkpoint", str(tmp_path), "resume", str(root), model_dir)
    uninterrupted = torch.load(tmp_path / "checkpoint_run.pt")
    resumed = torch.load(tmp_path / "checkpoint_resume.pt")
    assert list(resumed) == [3]
    assert resumed[3] == uninterrupted[3], (resumed, uninterrupted)
    assert uninterrupted[3] != uninterrupted[2]


def test_incomplete_and_pruned_checkpoints(tmp_path):
    """Only directories with the metadata file count; a leftover temporary directory is ignored."""
    for step in (1, 2, 3):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / METADATA_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "step_4").mkdir()  # crashed before its metadata was written
    (tmp_path / ".tmp_step_5").mkdir()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_1", "step_2", "step_3"]
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [path.name for path in deleted] == ["step_1"]
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2", "step_3"]


def test_load_refuses_corrupted_weights(tiny_checkpoints, tmp_path, single_process_megatron):
    from policy_probes import make_policy, train_step

    policy = make_policy(tiny_checkpoints["llama"])
    train_step(policy, make_train_batch())
    path = policy.save_checkpoint(tmp_path, 1)
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["weight_fingerprint"] *= 1.01
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="fingerprint"):
        policy.load_checkpoint(path)
    (path / METADATA_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        policy.load_checkpoint(path)


def test_hf_export_after_training_loads_in_transformers(tiny_checkpoints, tmp_path, single_process_megatron):
    from policy_probes import make_policy, train_step
    from tiny_models import hf_response_logprobs
    from transformers import AutoModelForCausalLM

    policy = make_policy(tiny_checkpoints["qwen3"])
    batch = make_train_batch()
    train_step(policy, batch)
    exported = AutoModelForCausalLM.from_pretrained(policy.save_hf(tmp_path / "hf")).eval()
    hf_T = hf_response_logprobs(exported, batch)
    assert (policy.compute_logprobs(batch) - hf_T).abs().max() <= 1e-4
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / ".tmp_hf").exists()


def _stepper(batch, old_logprobs_T):
    """step(policy) -> (loss, weight fingerprint) of one update on `batch` with fixed old logprobs."""
    from policy_probes import train_step

    from guide_mega.training.checkpoint import weight_fingerprint

    def step(policy):
        loss = train_step(policy, batch, old_logprobs_T=old_logprobs_T)["loss"]
        return loss, weight_fingerprint(policy.module)

    return step


def _adam_fused_flags(policy) -> set:
    optimizer = policy.runner.optimizer
    inners = [inner.optimizer for inner in inner_optimizers(optimizer)]
    return {group["fused"] for inner in inners for group in inner.param_groups}


def _steps_after_resume(tiny_checkpoints, tmp_path, *, steps_before: int) -> None:
    """Train `steps_before` steps, save, train two more; a fresh policy loading the save must take the same two steps
    (loss and weights equal), and the save itself must move no weight. Every step reuses the old logprobs of the
    initial weights (PPO epochs on one batch)."""
    from policy_probes import make_policy

    from guide_mega.training.checkpoint import weight_fingerprint

    batch = make_train_batch()
    saving = make_policy(tiny_checkpoints["llama"])
    step = _stepper(batch, saving.compute_old_logprobs(batch))
    for _ in range(steps_before):
        step(saving)
    before = weight_fingerprint(saving.module)
    path = saving.save_checkpoint(tmp_path / str(steps_before), steps_before)
    assert weight_fingerprint(saving.module) == before
    expected = [step(saving) for _ in range(2)]

    resumed = make_policy(tiny_checkpoints["llama"])
    assert resumed.load_checkpoint(path)[0] == steps_before
    assert _adam_fused_flags(saving) == _adam_fused_flags(resumed) == {True}  # torch's fused Adam, before and after
    assert [step(resumed) for _ in range(2)] == expected
    return expected


def test_resumed_updates_equal_the_uninterrupted_ones(tiny_checkpoints, tmp_path, single_process_megatron):
    """Two updates after a resume, not just the first loss: Adam's per-parameter step counters must survive the
    load (Megatron's non-Apex path loads one shared counter)."""
    _steps_after_resume(tiny_checkpoints, tmp_path, steps_before=2)


def test_a_never_stepped_optimizer_saves_and_resumes_like_a_fresh_one(
    tiny_checkpoints, tmp_path, single_process_megatron
):
    """A run whose first steps had nothing to train can still be checkpointed (Slurm preemption), and saving does
    not change the run: its next steps equal those of a policy that never saved."""
    from policy_probes import make_policy

    expected = _steps_after_resume(tiny_checkpoints, tmp_path, steps_before=0)
    never_saved = make_policy(tiny_checkpoints["llama"])
    batch = make_train_batch()
    step = _stepper(batch, never_saved.compute_old_logprobs(batch))
    assert [step(never_saved) for _ in range(2)] == expected


def test_a_checkpoint_saved_by_unfused_adam_resumes_fused(tiny_checkpoints, tmp_path, single_process_megatron):
    """Param groups travel in the checkpoint: one written before Adam ran fused loads its groups unfused, and the
    load turns the fused kernel on again."""
    from policy_probes import make_policy

    saving = make_policy(tiny_checkpoints["llama"])
    optimizer = saving.runner.optimizer
    for inner in inner_optimizers(optimizer):
        for group in inner.optimizer.param_groups:
            group["fused"] = None
    path = saving.save_checkpoint(tmp_path / "unfused", 0)
    resumed = make_policy(tiny_checkpoints["llama"])
    resumed.load_checkpoint(path)
    assert _adam_fused_flags(saving) == {None} and _adam_fused_flags(resumed) == {True}


class _GroupStepAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam bookkeeping (TE cannot be installed on a CPU machine, so this stands in for
    it): the step counter lives in the param groups, the moments in the per-parameter state."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for param in group["params"]:
                self.state[param]["exp_avg"] = torch.zeros_like(param) + 1.0


class _Inner:
    """The part of a Megatron optimizer the save path uses: `.optimizer` and the dummy-state initialiser (which,
    like Megatron's, steps once on zero gradients)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def _init_optimizer_states_with_dummy_values(self):
        self.optimizer.step()


def test_a_never_stepped_fused_adam_saves_at_step_zero_and_keeps_no_trace():
    from guide_mega.training.checkpoint import _savable_optimizer_state

    param = torch.nn.Parameter(torch.ones(3))
    inner = _Inner(_GroupStepAdam([param]))
    with _savable_optimizer_state(inner):
        assert inner.optimizer.param_groups[0]["step"] == 0  # what is written: a fresh optimizer
        assert torch.equal(inner.optimizer.state[param]["exp_avg"], torch.zeros(3))
    assert "step" not in inner.optimizer.param_groups[0] and not inner.optimizer.state
    assert torch.equal(param.detach(), torch.ones(3))
