"""Checkpoint integrity: a missing, truncated or corrupted file is found and named, and resume takes the previous
checkpoint instead."""

import json
import shutil

import pytest

from guide_mega.trainer import CRITIC_DIR, latest_checkpoint
from guide_mega.training.checkpoint import (
    MANIFEST_KEY,
    METADATA_FILE,
    CheckpointError,
    newest_valid_checkpoint,
    verify_checkpoint,
)


def _copy(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    return root


def _largest_file(checkpoint) -> str:
    files = json.loads((checkpoint / METADATA_FILE).read_text())[MANIFEST_KEY]
    return max(files, key=lambda name: files[name]["bytes"])


def test_the_manifest_covers_every_file_and_verifies(saved):
    checkpoint = saved / "step_2"
    files = verify_checkpoint(checkpoint)[MANIFEST_KEY]
    written = {str(path.relative_to(checkpoint)) for path in checkpoint.rglob("*") if path.is_file()}
    assert set(files) == written - {METADATA_FILE} and any(name.endswith(".distcp") for name in files)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"has \d+ bytes, not the \d+ written"),
        (_flip_a_byte, r"is corrupt \(its CRC-32 differs"),
        (lambda path: path.unlink(), r"is incomplete: .* is missing"),
    ],
    ids=["truncated", "corrupt", "missing"],
)
def test_a_damaged_file_is_named_and_resume_takes_the_previous_checkpoint(damage, message, saved, tmp_path):
    root = _copy(saved, tmp_path)
    name = _largest_file(root / "step_2")
    damage(root / "step_2" / name)
    with pytest.raises(CheckpointError, match=message) as error:
        verify_checkpoint(root / "step_2")
    assert f"checkpoint {root / 'step_2'}" in str(error.value) and name in str(error.value)

    found, skipped = newest_valid_checkpoint(root)
    assert found == root / "step_1" and skipped == [str(error.value)]
    assert latest_checkpoint(root, mode="auto") == (root / "step_1", skipped)


def test_corrupt_metadata_and_a_damaged_critic(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "step_2" / METADATA_FILE).write_text('{"step": 2, "files": {')
    with pytest.raises(CheckpointError, match=f"{METADATA_FILE} is corrupt"):
        verify_checkpoint(root / "step_2")
    assert latest_checkpoint(root, mode="auto")[0] == root / "step_1"
    # PPO: a checkpoint counts only with its critic beside it intact.
    shutil.copytree(saved, root / CRITIC_DIR)
    _truncate(root / CRITIC_DIR / "step_1" / _largest_file(root / CRITIC_DIR / "step_1"))
    found, skipped = latest_checkpoint(root, mode="auto", with_critic=True)
    assert found is None and len(skipped) == 2 and "critic" in skipped[1]
    with pytest.raises(ValueError, match="holds no complete, valid checkpoint; .*corrupt"):
        latest_checkpoint(root, mode="must", with_critic=True)


def test_loading_a_truncated_checkpoint_fails_clearly(saved, tmp_path, tiny_checkpoints, single_process_megatron):
    from policy_probes import make_policy

    root = _copy(saved, tmp_path)
    _truncate(root / "step_2" / _largest_file(root / "step_2"))
    policy = make_policy(tiny_checkpoints["llama"])
    with pytest.raises(CheckpointError, match="not the .* written"):
        policy.load_checkpoint(root / "step_2")
    assert policy.load_checkpoint(root / "step_1")[0] == 1
