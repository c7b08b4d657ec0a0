"""`guide-mega convert`: HF -> Megatron -> HF round trips, and a trainer checkpoint to HF, on tiny models (CPU)."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_VOCAB, make_train_batch
from torchrun_launch import run_torchrun
from transformers import AutoModelForCausalLM

from guide_mega.cli import main as cli_main
from guide_mega.training.checkpoint import CheckpointError
from guide_mega.training.checkpoint_conversion import hf_to_megatron, load_megatron_checkpoint, megatron_to_hf

FAMILIES = ("llama", "qwen2", "qwen3")
# fp32 on both sides; the same products summed in a different order (as in test_logprob_parity.py).
MAX_LOGIT_DIFF = 1e-4


def _weights(hf_dir) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(hf_dir.glob("*.safetensors")) for name, t in load_file(path).items()}


def _input_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _hf_logits(hf_dir) -> torch.Tensor:
    """[S, V] logits of transformers' model on the fixed input."""
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(_input_ids()).logits[0]


@torch.no_grad()
def _megatron_logits(module) -> torch.Tensor:
    """[S, V] logits of the Megatron model: its final hidden states times the LM head, padding rows dropped."""
    input_ids = _input_ids()
    length = input_ids.shape[1]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
    hidden_SBH = module(input_ids=input_ids, position_ids=torch.arange(length)[None], attention_mask=causal)
    return hidden_SBH[:, 0] @ module.output_weight()[:TINY_VOCAB].T


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_hf_round_trip(family, tiny_checkpoints, tmp_path, single_process_megatron):
    source = tiny_checkpoints[family]
    megatron_dir = hf_to_megatron(source, tmp_path / "megatron")
    assert (megatron_dir / "hf_config" / "config.json").is_file() and not (tmp_path / ".tmp_megatron").exists()

    module, *_ = load_megatron_checkpoint(megatron_dir)
    expected_logits = _hf_logits(source)
    assert (_megatron_logits(module) - expected_logits).abs().max() <= MAX_LOGIT_DIFF

    hf_dir = megatron_to_hf(megatron_dir, tmp_path / "hf")
    original, round_trip = _weights(source), _weights(hf_dir)
    assert original.keys() == round_trip.keys()
    for name, tensor in original.items():
        assert torch.equal(round_trip[name], tensor), name
    assert torch.equal(_hf_logits(hf_dir), expected_logits)


def test_cli_converts_both_ways(tiny_checkpoints, tmp_path, single_process_megatron):
    source = tiny_checkpoints["qwen2"]
    assert cli_main(["convert", "hf-to-megatron", str(source), str(tmp_path / "megatron")]) == 0
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "hf")]) == 0
    assert torch.equal(_hf_logits(tmp_path / "hf"), _hf_logits(source))


def test_trainer_checkpoint_to_hf(tiny_checkpoints, tmp_path, single_process_megatron):
    from policy_probes import make_policy, train_step

    policy = make_policy(tiny_checkpoints["llama"])
    train_step(policy, make_train_batch())
    checkpoint = policy.save_checkpoint(tmp_path / "checkpoints", 1)
    exported = policy.save_hf(tmp_path / "exported")
    with pytest.raises(ValueError, match="--hf-config"):
        megatron_to_hf(checkpoint, tmp_path / "hf")
    converted = megatron_to_hf(checkpoint, tmp_path / "hf", hf_config_dir=tiny_checkpoints["llama"])
    expected, got = _weights(exported), _weights(converted)
    assert expected.keys() == got.keys() and all(torch.equal(got[name], t) for name, t in expected.items())
    (next(checkpoint.glob("*.distcp"))).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="distcp"):
        megatron_to_hf(checkpoint, tmp_path / "hf2", hf_config_dir=tiny_checkpoints["llama"])


@pytest.mark.distributed
def test_tensor_parallel_conversion_round_trip(tiny_checkpoints, tmp_path):
    """Each of two ranks converts its tensor-parallel shard; the way back gathers them (the checkpoint's layout)."""
    source = tiny_checkpoints["llama"]
    megatron_dir, hf_dir = str(tmp_path / "megatron"), str(tmp_path / "hf")
    run_torchrun(2, "convert", "hf-to-megatron", str(source), megatron_dir, "--tensor", "2", module="guide_mega.cli")
    run_torchrun(2, "convert", "megatron-to-hf", megatron_dir, hf_dir, module="guide_mega.cli")
    original, round_trip = _weights(source), _weights(tmp_path / "hf")
    assert original.keys() == round_trip.keys()
    for name, tensor in original.items():
        assert torch.equal(round_trip[name], tensor), name


def test_a_failed_read_while_converting_is_a_clear_error(tiny_checkpoints, tmp_path, single_process_megatron):
    from torch.distributed.checkpoint import FileSystemReader

    from guide_mega.training.checkpoint import CheckpointError

    megatron_dir = tmp_path / "megatron"
    hf_to_megatron(tiny_checkpoints["llama"], megatron_dir)

    def failing_read(*args, **kwargs):
        raise OSError(5, "Input/output error")

    # torch reports a failed shard read as CheckpointException, a BaseException the CLI's error line would miss.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FileSystemReader, "read_data", failing_read)
        with pytest.raises(CheckpointError, match=r"megatron: loading failed on rank 0: .*Input/output error"):
            load_megatron_checkpoint(megatron_dir)
