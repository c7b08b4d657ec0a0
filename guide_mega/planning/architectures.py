"""The shape of a dense decoder (Llama-3 / Qwen2 / Qwen2.5 / Qwen3 families), enough to count its bytes.

A model's shape comes from `model.path/config.json` when that file exists; otherwise from `KNOWN_MODELS`, a table
of the models the shipped configs name, selected by the path's last component (case-insensitive, an '-Instruct'
suffix ignored) or by name. The table's numbers are the models' published sizes (their HF config.json), written
here as facts so that a 72B plan needs no checkpoint on the planning machine.

Parameter counts follow the Megatron layout the trainer builds (`training/architecture.py`): fused QKV and
gate/up projections, RMSNorm weights replicated over tensor-parallel ranks, the vocabulary padded to a multiple
of 128 x TP rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Megatron pads the embedding and LM head to a multiple of this times TP (training/architecture.py: the same rule).
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Sizes of a dense GQA decoder with a SwiGLU MLP and RMSNorm."""

    name: str
    source: str
    """Where the numbers came from: a config.json path, or 'known models table'."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    def padded_vocab(self, tensor_parallel: int) -> int:
        """Rows of the embedding and LM head in the Megatron model at this TP (zero rows past `vocab`)."""
        multiple = VOCAB_PAD_MULTIPLE * tensor_parallel
        return math.ceil(self.vocab / multiple) * multiple

    def layer_sharded_params(self) -> int:
        """Parameters of one layer split over tensor-parallel ranks: q, k, v (and their bias), output, MLP."""
        attention_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        qkv = self.hidden * attention_width + (attention_width if self.qkv_bias else 0)
        output = self.heads * self.head_dim * self.hidden
        return qkv + output + 3 * self.hidden * self.intermediate

    def layer_replicated_params(self) -> int:
        """Parameters of one layer held whole by every tensor-parallel rank: the two RMSNorms (and q/k norms)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def num_params(self) -> int:
        """Parameters of the HF checkpoint (vocabulary unpadded; a tied LM head counted once)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        per_layer = self.layer_sharded_params() + self.layer_replicated_params()
        return self.layers * per_layer + embeddings + self.hidden

    def kv_bytes_per_token(self, tensor_parallel: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token on one GPU of an engine at this TP (KV heads replicated when TP > kv_heads)."""
        return 2 * self.layers * kv_heads_per_gpu(self, tensor_parallel) * self.head_dim * dtype_bytes


def kv_heads_per_gpu(shape: ModelShape, tensor_parallel: int) -> int:
    """KV heads each GPU of a TP group holds: kv_heads / TP, or 1 (replicated) when TP is a multiple of kv_heads."""
    if shape.kv_heads % tensor_parallel == 0:
        return shape.kv_heads // tensor_parallel
    if tensor_parallel % shape.kv_heads == 0:
        return 1
    raise ValueError(f"{shape.name}: {shape.kv_heads} KV heads cannot be split or replicated over TP {tensor_parallel}")


def _known(name: str, **sizes) -> ModelShape:
    return ModelShape(name=name, source="known models table", **sizes)


_QWEN25_7B = {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate": 18944}
KNOWN_MODELS: dict[str, ModelShape] = {
    "qwen2.5-math-7b": _known("qwen2.5-math-7b", **_QWEN25_7B, head_dim=128, vocab=152064, tied=False, qkv_bias=True),
    "qwen2.5-7b": _known("qwen2.5-7b", **_QWEN25_7B, head_dim=128, vocab=152064, tied=False, qkv_bias=True),
    "qwen2.5-32b": _known(
        "qwen2.5-32b",
        hidden=5120,
        layers=64,
        heads=40,
        kv_heads=8,
        head_dim=128,
        intermediate=27648,
        vocab=152064,
        tied=False,
        qkv_bias=True,
    ),  # fmt: skip
    "qwen2.5-72b": _known(
        "qwen2.5-72b",
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        head_dim=128,
        intermediate=29568,
        vocab=152064,
        tied=False,
        qkv_bias=True,
    ),  # fmt: skip
    "smollm2-135m-instruct": _known(
        "smollm2-135m-instruct",
        hidden=576,
        layers=30,
        heads=9,
        kv_heads=3,
        head_dim=64,
        intermediate=1536,
        vocab=49152,
        tied=True,
    ),  # fmt: skip
}


def read_model_shape(config_json: str | Path) -> ModelShape:
    """The shape in an HF config.json (ValueError naming the file and the missing key)."""
    path = Path(config_json)
    hf = json.loads(path.read_text())
    try:
        heads = hf["num_attention_heads"]
        return ModelShape(
            name=path.parent.name,
            source=str(path),
            hidden=hf["hidden_size"],
            layers=hf["num_hidden_layers"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate=hf["intermediate_size"],
            vocab=hf["vocab_size"],
            tied=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=hf.get("model_type") == "qwen2",
            qk_norm=hf.get("model_type") == "qwen3",
        )
    except KeyError as exc:
        raise ValueError(f"{path}: no {exc.args[0]!r}, which the memory plan needs") from None


def _table_key(name: str) -> str:
    key = name.strip().rstrip("/").rsplit("/", 1)[-1].removeprefix("embedded:").lower()
    return key.removesuffix("-instruct") if key.removesuffix("-instruct") in KNOWN_MODELS else key


def model_shape(model_path: str, arch: str | None = None) -> ModelShape:
    """The shape of `model_path`: `arch` from the table when given, else its config.json, else the table entry of
    its last path component; ValueError when none of these exists."""
    if arch is not None:
        if _table_key(arch) not in KNOWN_MODELS:
            raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_MODELS)}")
        return KNOWN_MODELS[_table_key(arch)]
    config_json = Path(model_path) / "config.json"
    if not model_path.startswith("embedded:") and config_json.is_file():
        return read_model_shape(config_json)
    if _table_key(model_path) in KNOWN_MODELS:
        return KNOWN_MODELS[_table_key(model_path)]
    raise ValueError(
        f"model.path {model_path!r} has no readable config.json and its name is not a known model "
        f"({', '.join(KNOWN_MODELS)}); pass --arch NAME or point model.path at an HF checkpoint"
    )
