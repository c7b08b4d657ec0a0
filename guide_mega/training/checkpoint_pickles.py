"""The pickles inside a Megatron `torch_dist` checkpoint, checked through allowlists before Megatron reads them.

A checkpoint directory may come from an untrusted place (a shared disk, a download), and unpickling runs code.
Three kinds of pickle are read when a checkpoint loads: `.metadata` (torch's `pickle.load`), the pickled items
inside the `.distcp` shards (torch's `torch.load(weights_only=False)`) and `common.pt` (`torch.load`). Each is
loaded here first, `.metadata` through an unpickler that resolves only torch's checkpoint-metadata classes, the
others with `weights_only=True`, so a checkpoint holding anything else is refused before Megatron touches it.
The files are the ones the manifest check just listed; a directory rewritten between this check and the load
(by someone who can already write there) is outside what this guards.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

DIST_METADATA_FILE = ".metadata"
COMMON_STATE_FILE = "common.pt"
# Everything torch's checkpoint metadata pickles (torch 2.x); dtypes and layouts are allowed separately below.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "TensorWriteData", "WriteItem", "WriteItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
}


class UnsafePickleError(ValueError):
    """A pickle that names a global outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafePickleError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def load_dist_metadata(checkpoint_dir: Path) -> Metadata:
    """The torch_dist `.metadata` of a checkpoint, unpickled through the allowlist; raises UnsafePickleError."""
    with (checkpoint_dir / DIST_METADATA_FILE).open("rb") as stream:
        try:
            metadata = _MetadataUnpickler(stream).load()
        except UnsafePickleError:
            raise
        except Exception as exc:
            raise UnsafePickleError(f"{DIST_METADATA_FILE} is not readable metadata ({exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafePickleError(f"{DIST_METADATA_FILE} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _load_weights_only(data: io.BytesIO | Path, what: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message opens with advice on how to load it anyway; the line naming the global is the one to keep.
        lines = str(exc).strip().splitlines()
        reason = next((line.strip() for line in lines if "Unpickler error" in line), lines[0])
        raise UnsafePickleError(f"{what}: not allowed ({reason})") from None
    except (RuntimeError, EOFError) as exc:
        raise UnsafePickleError(f"{what}: not a readable torch file ({exc})") from None


def check_checkpoint_pickles(checkpoint_dir: Path, listed: set[str]) -> None:
    """Load every pickle Megatron would read from `checkpoint_dir` through an allowlist; raises UnsafePickleError.

    `listed` holds the manifest's file names: a shard the metadata points at must be one of them.
    """
    metadata = load_dist_metadata(checkpoint_dir)
    for index, info in metadata.storage_data.items():
        if info.relative_path not in listed:
            raise UnsafePickleError(f"{DIST_METADATA_FILE} points at {info.relative_path!r}, not a listed file")
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafePickleError(f"{index.fqn}: transformed (e.g. compressed) items are not written by this trainer")
        with (checkpoint_dir / info.relative_path).open("rb") as stream:
            stream.seek(info.offset)
            item = io.BytesIO(stream.read(info.length))
        _load_weights_only(item, f"{info.relative_path} item {index.fqn}")
    if (checkpoint_dir / COMMON_STATE_FILE).is_file():
        _load_weights_only(checkpoint_dir / COMMON_STATE_FILE, COMMON_STATE_FILE)
