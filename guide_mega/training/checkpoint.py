"""Checkpoints: Megatron distributed checkpoints for resume, and HF safetensors exports that transformers loads.

A resume checkpoint `<root>/step_<n>` holds the sharded model and distributed-optimizer state (Megatron
`dist_checkpointing`, every rank writes its shards), the LR scheduler, caller-provided extra state, and
`guide_mega.json` with the step, the parallel layout and a weight fingerprint. Every checkpoint is written into
`<root>/.tmp_step_<n>` and renamed when complete, so a crash mid-save leaves no directory that looks valid.
`guide_mega.json` also lists every file with its size and CRC-32: `verify_checkpoint` finds a file missing,
truncated or corrupt, `newest_valid_checkpoint` skips such checkpoints for the previous one, and loading recomputes
the fingerprint and refuses a checkpoint whose weights do not match it. A checkpoint may come from an untrusted
place: the manifest must list exactly the files present, and every pickle Megatron would read passes an allowlist
first (`checkpoint_pickles.py`). A failed save or load is a CheckpointError, on every rank.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from guide_mega.training.architecture import ModelArchitecture
from guide_mega.training.checkpoint_pickles import UnsafePickleError, check_checkpoint_pickles
from guide_mega.training.distributed import ParallelLayout
from guide_mega.training.optimizer import inner_optimizers, use_fused_adam
from guide_mega.training.weight_export import iter_hf_weight_buckets

METADATA_FILE = "guide_mega.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Optimizer state sharded exactly as the distributed optimizer holds it: parallel save/load, no gathers; resuming
# keeps the tensor/pipeline layout (data-parallel size may change).
_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
# Relative tolerance of the weight fingerprint (a float64 sum of squares; only reduction order can differ).
FINGERPRINT_RTOL = 1e-9
# Key of the metadata's file manifest: {relative path: {"bytes": size, "crc32": checksum}}.
MANIFEST_KEY = "files"
_CHECKSUM_CHUNK_BYTES = 16 << 20
_REQUIRED_METADATA = ("tensor_parallel", "pipeline_parallel", "weight_fingerprint")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, truncated, corrupt or does not fit this run; the message names the file."""


def _is_global_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _file_checksum(path: Path) -> int:
    checksum = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHECKSUM_CHUNK_BYTES):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def file_manifest(directory: Path) -> dict[str, dict[str, int]]:
    """{relative path: {"bytes", "crc32"}} of every file under `directory` (collective: ranks split the files)."""
    rank, world = _rank_and_world()
    names = sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())
    mine = {
        name: {"bytes": (directory / name).stat().st_size, "crc32": _file_checksum(directory / name)}
        for name in names[rank::world]
    }
    if world == 1:
        return mine
    shares: list[dict | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: entry for share in shares for name, entry in sorted(share.items())}


def weight_fingerprint(module: torch.nn.Module) -> float:
    """Sum of squares (float64) of every model weight, each tensor-parallel replica counted once, over all stages."""
    total = torch.zeros((), dtype=torch.float64)
    for param in module.parameters():
        # `shared` marks the last stage's copy of a tied embedding (pipeline parallel), which would count twice.
        if param_is_not_tensor_parallel_duplicate(param) and not getattr(param, "shared", False):
            total += param.detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else total.device
        total = total.to(device)
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total)


def _sharded_state(module, optimizer, scheduler, extra: dict, *, is_loading: bool) -> dict:
    model_state = module.sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=_OPTIMIZER_SHARDING),
        "scheduler": scheduler.state_dict(),
        "extra": extra,
    }


@contextmanager
def checkpoint_failures_as_errors(path: Path, action: str):
    """Raise a CheckpointError naming the checkpoint, the action and each failed rank's cause for a failed
    Megatron save or load: torch reports it as CheckpointException, a BaseException that `except Exception`
    (and so the CLI's one-line error handling) would let through as a traceback."""
    try:
        yield
    except CheckpointException as exc:
        causes = "; ".join(
            f"on rank {rank}: {type(failure).__name__}: {failure}"
            for rank, (failure, _trace) in sorted(exc.failures.items())
        )
        raise CheckpointError(f"checkpoint {path}: {action} failed {causes}") from None
    except (CheckpointingException, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: {action} failed: {type(exc).__name__}: {exc}") from None


@contextmanager
def single_threaded_cpu_ops():
    """Run torch CPU ops on one thread for the duration.

    Megatron's torch_dist writer forks worker processes. A child forked after the parent ran OpenMP-parallel
    torch ops with more than one thread hangs in its first parallel op (libgomp's thread pool does not survive
    fork), so the save would never finish once training has used more than one CPU thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _savable_optimizer_state(optimizer):
    """Let a never-stepped optimizer be saved, and leave it exactly as it was.

    Megatron's distributed optimizer cannot write a state dict before torch's Adam has state (a run whose first
    steps all had no reward variance, then preempted). For the save it gets zero moments at step 0, which is what
    a fresh Adam is; the parameters its dummy step moved (weight decay) are put back before anything is written,
    and the state is emptied again afterwards, so the next real step is the same whether or not a save happened.
    Torch's Adam counts steps in each parameter's state; Transformer Engine's FusedAdam counts them in the param
    groups, so the groups' counters are written as 0 and put back as they were too.
    """
    fresh = [inner for inner in inner_optimizers(optimizer) if not inner.optimizer.state]
    group_steps = {id(inner): [group.get("step") for group in inner.optimizer.param_groups] for inner in fresh}
    for inner in fresh:
        params = [p for group in inner.optimizer.param_groups for p in group["params"]]
        copies = [p.detach().clone() for p in params]
        inner._init_optimizer_states_with_dummy_values()
        for group in inner.optimizer.param_groups:
            if "step" in group:
                group["step"] = torch.zeros_like(group["step"]) if torch.is_tensor(group["step"]) else 0
        with torch.no_grad():
            for param, copy in zip(params, copies, strict=True):
                param.copy_(copy)
        for param_state in inner.optimizer.state.values():
            for value in param_state.values():
                if torch.is_tensor(value):
                    value.zero_()
    try:
        yield
    finally:
        for inner in fresh:
            inner.optimizer.state.clear()
            for group, step in zip(inner.optimizer.param_groups, group_steps[id(inner)], strict=True):
                if step is None:
                    group.pop("step", None)
                else:
                    group["step"] = step


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    module: torch.nn.Module,
    optimizer,
    scheduler,
    layout: ParallelLayout,
    extra: dict | None = None,
) -> Path:
    """Write `<root>/step_<step>` atomically (collective: every rank calls it). Returns the final path."""
    root = Path(root)
    final, temporary = root / f"step_{step}", root / f".tmp_step_{step}"
    if _is_global_rank_zero():
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()
    error = None
    try:
        with checkpoint_failures_as_errors(final, "saving"), _savable_optimizer_state(optimizer):
            state = _sharded_state(module, optimizer, scheduler, extra or {}, is_loading=False)
            with single_threaded_cpu_ops():
                dist_checkpointing.save(state, str(temporary))
        fingerprint = weight_fingerprint(module)
        _barrier()
        files = file_manifest(temporary)
        if _is_global_rank_zero():
            metadata = {
                "step": step,
                "tensor_parallel": layout.tensor,
                "pipeline_parallel": layout.pipeline,
                "weight_fingerprint": fingerprint,
                MANIFEST_KEY: files,
            }
            with checkpoint_failures_as_errors(final, "saving"):
                (temporary / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            temporary.rename(final)
    except CheckpointError as exc:
        error = str(exc)
    # Agreed on by every rank: rank 0 alone writes the metadata, and a rank that raised alone would leave the others
    # waiting in the next collective.
    error = _agreed_error(error)
    if error is not None:
        # A full disk is the usual cause: free the partial write; the previous checkpoints were never touched.
        if _is_global_rank_zero():
            shutil.rmtree(temporary, ignore_errors=True)
        free_gib = shutil.disk_usage(root).free / 2**30
        raise CheckpointError(f"{error} ({free_gib:.1f} GiB free under {root}; earlier checkpoints are kept)")
    return final


def _step_directories(root: Path) -> list[Path]:
    """Every `step_<n>` directory under root, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := _STEP_DIR.match(path.name))]
    return [path for _, path in sorted(found)]


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root (a metadata file present), oldest first."""
    return [path for path in _step_directories(Path(root)) if (path / METADATA_FILE).is_file()]


def _read_metadata(path: Path) -> dict:
    metadata_path = path / METADATA_FILE
    if not metadata_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {METADATA_FILE} is missing")
    try:
        metadata = json.loads(metadata_path.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} is corrupt ({exc})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} is corrupt (not a JSON object)")
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} lacks {missing}")
    return metadata


def _checked_manifest(path: Path, manifest: object) -> dict[str, dict[str, int]]:
    """The manifest, once it lists exactly the regular files under `path` (besides the metadata file)."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} has no file list ('{MANIFEST_KEY}'); refused")
    for name, entry in manifest.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or name == METADATA_FILE:
            raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} lists {name!r}, a path outside the checkpoint")
        if not isinstance(entry, dict) or not all(type(entry.get(key)) is int for key in ("bytes", "crc32")):
            raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} entry {name!r} is not {{bytes, crc32}}")
    for found in sorted(path.rglob("*")):
        name = str(found.relative_to(path))
        if found.is_symlink():
            raise CheckpointError(f"checkpoint {path}: {name} is a symbolic link; a checkpoint holds only files")
        if found.is_file() and name != METADATA_FILE and name not in manifest:
            raise CheckpointError(f"checkpoint {path} holds {name}, which its manifest does not list")
    return manifest


def verify_checkpoint(path: str | Path, *, checksums: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """The checkpoint's metadata, once its manifest lists exactly the files present, each with its recorded size and
    (with `checksums`) its recorded CRC-32, and every pickle Megatron would read passes its allowlist. This process
    checksums files[rank::world_size]; sizes are checked for all.

    Raises CheckpointError naming the checkpoint and the bad file. The CRC-32s find damage, not tampering (anyone
    can recompute them): the allowlists are what make a checkpoint from an untrusted place safe to load.
    """
    path = Path(path)
    metadata = _read_metadata(path)
    manifest = _checked_manifest(path, metadata.get(MANIFEST_KEY))
    for index, (name, expected) in enumerate(sorted(manifest.items())):
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file_path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, not the {expected['bytes']} written")
        if checksums and index % world_size == rank and _file_checksum(file_path) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its CRC-32 differs from the one written)")
    try:
        check_checkpoint_pickles(path, set(manifest))
    except UnsafePickleError as exc:
        raise CheckpointError(f"checkpoint {path}: a pickle in it is refused: {exc}") from None
    return metadata


def _verification_error(paths: list[Path]) -> str | None:
    """The first CheckpointError of any of `paths`, agreed on by all ranks (collective), or None."""
    rank, world = _rank_and_world()
    try:
        for path in paths:
            verify_checkpoint(path, rank=rank, world_size=world)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    return _agreed_error(error)


def _agreed_error(error: str | None) -> str | None:
    """The first rank's error message, or None when no rank has one (collective)."""
    world = _rank_and_world()[1]
    if world == 1:
        return error
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error)
    return next((message for message in errors if message), None)


def newest_valid_checkpoint(
    root: str | Path, *, companions: Sequence[str | Path] = ()
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under root that verifies with checksums, its same-step checkpoints under each companion
    root too (e.g. the critic's), and the errors of the newer ones it skipped.

    Collective when torch.distributed is initialised: the ranks share the checksumming and agree on the answer.
    """
    skipped = []
    # Every step directory, so that one without its metadata (copied in part, or edited) is named, not passed over.
    for path in reversed(_step_directories(Path(root))):
        error = _verification_error([path, *(Path(companion) / path.name for companion in companions)])
        if error is None:
            return path, skipped
        logger.warning("skipping checkpoint: %s", error)
        skipped.append(error)
    return None, skipped


def prune_checkpoints(root: str | Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last complete checkpoints (rank 0 deletes); returns the deleted paths."""
    stale = list_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    if _is_global_rank_zero():
        for path in stale:
            shutil.rmtree(path)
    _barrier()
    return stale


def _materialise_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its Adam state before loading into it.

    Without Apex or Transformer Engine, Megatron wraps torch's Adam, which creates its state (including the
    'step' counter that the distributed optimizer's state_dict requires) only on its first step. Megatron's own
    dummy-state initialiser does exactly that; the loaded checkpoint then overwrites every value.
    """
    for inner in inner_optimizers(optimizer):
        if len(inner.optimizer.state) == 0:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter's Adam state its own 'step' tensor, set from its loaded param group, after a load.

    Without Apex or Transformer Engine, Megatron's distributed optimizer keeps the step count in the param groups
    and writes it into the states as one shared tensor (and on a fresh optimizer it ends up as the dummy
    initialiser's 1): torch's Adam increments each state's step in place, so every update after a resume would use
    the wrong bias correction.
    """
    for inner in inner_optimizers(optimizer):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                param_state = inner.optimizer.state.get(param, {})
                if "step" in group and torch.is_tensor(param_state.get("step")):
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=param_state["step"].dtype)


def load_checkpoint(path: str | Path, *, module: torch.nn.Module, optimizer, scheduler, layout: ParallelLayout):
    """Restore model, optimizer and scheduler from a checkpoint directory; returns (step, extra).

    Raises CheckpointError naming the checkpoint when a file is missing or truncated (sizes are checked before
    loading; `newest_valid_checkpoint` checks contents), it was written with another tensor/pipeline layout, or
    its loaded weights do not match the recorded fingerprint.
    """
    path = Path(path)
    metadata = verify_checkpoint(path, checksums=False)
    if type(metadata.get("step")) is not int:
        raise CheckpointError(f"checkpoint {path} records no training step (a converted model, not a resume point)")
    saved_layout = (metadata["tensor_parallel"], metadata["pipeline_parallel"])
    if saved_layout != (layout.tensor, layout.pipeline):
        raise CheckpointError(
            f"checkpoint {path} has (TP, PP) {saved_layout}, this run {(layout.tensor, layout.pipeline)}"
        )
    _materialise_optimizer_state(optimizer)
    state = _sharded_state(module, optimizer, scheduler, {}, is_loading=True)
    with checkpoint_failures_as_errors(path, "loading"):
        loaded = dist_checkpointing.load(state, str(path))
    # fp32 master weights are views of the model parameters: copy into them without recording autograd history.
    with torch.no_grad():
        module.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    use_fused_adam(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    fingerprint = weight_fingerprint(module)
    expected = metadata["weight_fingerprint"]
    if abs(fingerprint - expected) > FINGERPRINT_RTOL * max(abs(expected), 1.0):
        raise CheckpointError(
            f"checkpoint {path}: loaded weights' fingerprint {fingerprint!r} != recorded {expected!r}"
        )
    return metadata["step"], loaded["extra"]


# Name endings of the weight files of an HF checkpoint directory; exports copy every other file (config, tokenizer).
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def save_hf_checkpoint(
    out_dir: str | Path,
    *,
    module: torch.nn.Module,
    arch: ModelArchitecture,
    layout: ParallelLayout,
    source_dir: str | Path,
    bucket_bytes: int = 2 << 30,
) -> Path:
    """Write the model as an HF checkpoint (one safetensors file per bucket, an index, the source's config and
    tokenizer files) into out_dir, atomically (collective: every rank calls it; global rank 0 writes)."""
    out_dir = Path(out_dir)
    temporary = out_dir.with_name(f".tmp_{out_dir.name}")
    writer = _is_global_rank_zero()
    weight_map: dict[str, str] = {}
    if writer:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    for index, bucket in enumerate(iter_hf_weight_buckets(module, arch, layout, bucket_bytes=bucket_bytes)):
        if writer:
            file_name = f"model-{index + 1:05d}.safetensors"
            save_file({name: tensor.cpu() for name, tensor in bucket}, temporary / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys((name for name, _ in bucket), file_name))
    if writer:
        index_json = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (temporary / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        for source in Path(source_dir).iterdir():
            if source.is_file() and not source.name.endswith(HF_WEIGHT_SUFFIXES):
                shutil.copy2(source, temporary / source.name)
        shutil.rmtree(out_dir, ignore_errors=True)
        temporary.rename(out_dir)
    _barrier()
    return out_dir
