"""Checkpoints from untrusted places: pickles inside a checkpoint go through allowlists on every load path (a
recomputed manifest does not help: CRC-32 is integrity, not authentication), the manifest must list exactly the
files present, Megatron's CheckpointException becomes a CheckpointError, and a save that runs out of disk leaves
the previous checkpoint intact for resume."""

import io
import json
import logging
import os
import pickle
import resource
import shutil
import signal

import pytest
import torch

from guide_mega.training import checkpoint
from guide_mega.training.checkpoint import (
    MANIFEST_KEY,
    METADATA_FILE,
    CheckpointError,
    file_manifest,
    newest_valid_checkpoint,
    verify_checkpoint,
)


class _MakeDirectory:
    """Unpickling this creates a directory: what an attacker's payload would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _copy(saved, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    return root


def _rewrite_manifest(checkpoint_dir):
    # What an attacker does after editing a file: the CRC-32s are public knowledge, not a signature.
    metadata = json.loads((checkpoint_dir / METADATA_FILE).read_text())
    metadata[MANIFEST_KEY] = {
        name: entry for name, entry in file_manifest(checkpoint_dir).items() if name != METADATA_FILE
    }
    (checkpoint_dir / METADATA_FILE).write_text(json.dumps(metadata))


def _poison_metadata(checkpoint_dir, marker):
    (checkpoint_dir / ".metadata").write_bytes(pickle.dumps(_MakeDirectory(marker)))
    _rewrite_manifest(checkpoint_dir)


def _poison_a_bytes_item(checkpoint_dir, marker):
    """Point one pickled (BYTE_IO) item of the torch_dist checkpoint at a payload appended to its shard file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((checkpoint_dir / ".metadata").read_bytes())
    index, info = next(
        (index, info)
        for index, info in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    )
    payload = io.BytesIO()
    torch.save(_MakeDirectory(marker), payload)
    shard = checkpoint_dir / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload.getvalue())
    with shard.open("ab") as stream:
        stream.write(payload.getvalue())
    metadata.storage_data[index] = info
    (checkpoint_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(checkpoint_dir)


@pytest.mark.parametrize("poison", [_poison_metadata, _poison_a_bytes_item], ids=["metadata", "bytes_item"])
def test_a_pickle_payload_is_refused_on_every_load_path(
    poison, saved, tmp_path, tiny_checkpoints, single_process_megatron
):
    from policy_probes import make_policy

    root = _copy(saved, tmp_path)
    marker = tmp_path / "payload_ran"
    poison(root / "step_2", marker)
    with pytest.raises(CheckpointError, match=r"step_2: .* refused: .*not allowed"):
        verify_checkpoint(root / "step_2")
    found, skipped = newest_valid_checkpoint(root)
    assert found == root / "step_1" and "not allowed" in skipped[0]
    policy = make_policy(tiny_checkpoints["llama"])
    with pytest.raises(CheckpointError, match="not allowed"):
        policy.load_checkpoint(root / "step_2")
    assert not marker.exists()
    assert policy.load_checkpoint(root / "step_1")[0] == 1


def _drop_the_file_list(checkpoint_dir):
    metadata = json.loads((checkpoint_dir / METADATA_FILE).read_text())
    del metadata[MANIFEST_KEY]
    (checkpoint_dir / METADATA_FILE).write_text(json.dumps(metadata))


def _list_a_path_outside(checkpoint_dir):
    metadata = json.loads((checkpoint_dir / METADATA_FILE).read_text())
    metadata[MANIFEST_KEY]["../step_1/.metadata"] = metadata[MANIFEST_KEY][".metadata"]
    (checkpoint_dir / METADATA_FILE).write_text(json.dumps(metadata))


def _add_an_unlisted_file(checkpoint_dir):
    (checkpoint_dir / "extra.pt").write_bytes(b"not in the manifest")


def _link_a_listed_file(checkpoint_dir):
    (checkpoint_dir / "common.pt").unlink()
    (checkpoint_dir / "common.pt").symlink_to(checkpoint_dir.parent / "step_1" / "common.pt")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_drop_the_file_list, "has no file list"),
        (_list_a_path_outside, r"lists '\.\./step_1/\.metadata', a path outside the checkpoint"),
        (_add_an_unlisted_file, "holds extra.pt, which its manifest does not list"),
        (_link_a_listed_file, "common.pt is a symbolic link"),
    ],
    ids=["no_file_list", "path_outside", "unlisted_file", "symlink"],
)
def test_a_manifest_that_does_not_match_the_folder_is_refused(tamper, message, saved, tmp_path):
    root = _copy(saved, tmp_path)
    tamper(root / "step_2")
    with pytest.raises(CheckpointError, match=rf"checkpoint {root / 'step_2'}.*{message}"):
        verify_checkpoint(root / "step_2")
    assert newest_valid_checkpoint(root)[0] == root / "step_1"


def test_a_checkpoint_without_its_metadata_is_named_in_the_log(saved, tmp_path, caplog):
    root = _copy(saved, tmp_path)
    shutil.copytree(root / "step_2", root / "step_3")
    (root / "step_3" / METADATA_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        found, skipped = newest_valid_checkpoint(root)
    assert found == root / "step_2"
    assert skipped == [f"checkpoint {root / 'step_3'} is incomplete: {METADATA_FILE} is missing"]
    assert str(root / "step_3") in caplog.text


def test_a_checkpoint_exception_becomes_a_clear_error(saved, tmp_path, tiny_checkpoints, single_process_megatron):
    from policy_probes import make_policy
    from torch.distributed.checkpoint import FileSystemReader

    root = _copy(saved, tmp_path)
    policy = make_policy(tiny_checkpoints["llama"])

    def failing_read(*args, **kwargs):
        raise OSError(5, "Input/output error")

    # An I/O error while reading shards reaches us as torch's CheckpointException, a BaseException.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FileSystemReader, "read_data", failing_read)
        with pytest.raises(CheckpointError, match=r"step_2: loading failed on rank 0: .*Input/output error"):
            policy.load_checkpoint(root / "step_2")


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(
    saved, tmp_path, tiny_checkpoints, single_process_megatron
):
    from policy_probes import make_policy

    root = _copy(saved, tmp_path)
    policy = make_policy(tiny_checkpoints["llama"])
    largest = max(path.stat().st_size for path in (root / "step_2").iterdir())
    # A file-size limit makes writes fail part-way exactly as a full disk does (EFBIG instead of ENOSPC).
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, previous_limit[1]))
    try:
        with pytest.raises(
            CheckpointError, match=r"step_3: saving failed on rank 0: .*GiB free under .*earlier checkpoints are kept"
        ):
            policy.save_checkpoint(root, 3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert sorted(path.name for path in root.iterdir()) == ["step_1", "step_2"]
    assert newest_valid_checkpoint(root) == (root / "step_2", [])
    assert policy.load_checkpoint(root / "step_2")[0] == 2
