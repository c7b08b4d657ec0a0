"""Activation bytes of the Megatron policy: what one micro-batch saves for its backward, and the backward's transients.

The accounting is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4),
redone for our layer: GQA attention, a SwiGLU MLP, RMSNorm, no dropout, and no s x s attention scores on the GPU
(Transformer Engine's fused attention keeps only its output and the softmax log-sum-exp). Every tensor a layer
saves is listed with its bytes per token; tensor parallelism divides the head- and MLP-sharded ones, sequence
parallelism also the norms' inputs and outputs (their paper's 34 s b h / t per layer with SP).

Two layer specs:
  te     the GPU path: Transformer Engine layer spec, packed (THD) rows, Megatron's fused RoPE and fused SwiGLU
         (`training/architecture.py` turns them on with TE). Derived from the code, not measurable on a CPU.
  local  the CPU path (local spec, right-padded rows, unfused attention): measured tensor by tensor on the tiny
         models (tests/test_plan.py), so the shared terms (MLP, attention output, LM-head input) are checked.

Recompute (model.recompute): `full` keeps each layer's input only and re-runs one layer at a time in the backward;
`selective` re-runs core attention, which saves nothing here but the log-sum-exp (q, k, v and the output are
saved anyway); the local spec's selective recompute is not modelled (on a CPU Megatron's checkpointing, which
needs CUDA RNG states, runs neither kind).
"""

from __future__ import annotations

from dataclasses import dataclass

from guide_mega.planning.architectures import ModelShape

FP32 = 4
# Per response token, the loss's own saved tensors: logprob partials, ratios, masks, advantages (measured: ~57 B).
LOSS_BYTES_PER_TOKEN = 64
# Triton logprob backward (kernels/token_logprobs/kernel.py): dlogits rows per chunk, and the chunk's byte budget.
LOGPROB_CHUNK_TOKENS = 2048
LOGPROB_CHUNK_BUDGET = 1 << 30
# Chunked torch logprobs (CPU): token and vocabulary block sizes (kernels/token_logprobs/chunked.py).
CPU_TOKEN_CHUNK, CPU_VOCAB_CHUNK = 1024, 4096


@dataclass(frozen=True, kw_only=True)
class TrainerLayout:
    """How one pipeline stage of the policy runs: the parallel sizes and the per-micro-batch settings."""

    tensor: int
    pipeline: int
    data: int
    sequence_parallel: bool
    dtype_bytes: int
    recompute: str
    spec: str = "te"

    @property
    def norm_split(self) -> int:
        """What divides the norms' activations: TP under sequence parallelism, else nothing."""
        return self.tensor if self.sequence_parallel else 1


@dataclass(frozen=True, kw_only=True)
class MicroBatchShape:
    """One micro-batch: `rows` rows of `row_length` positions, predicting `response_tokens` tokens."""

    rows: int
    row_length: int
    response_tokens: int

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length


def layer_terms(shape: ModelShape, layout: TrainerLayout) -> dict[str, float]:
    """Bytes per token that one layer saves for its backward without recompute, by tensor."""
    b, t, split = layout.dtype_bytes, layout.tensor, layout.norm_split
    heads, groups, d = shape.heads, shape.kv_heads, shape.head_dim
    if layout.spec == "te":
        terms = {
            "RMSNorm input and output (x2, fused into the next GEMM)": 2 * 2 * shape.hidden * b / split,
            "RMSNorm statistics (x2, fp32)": 2 * FP32 / split,
            "fused QKV output (held by v) and rotated q, k": (2 * heads + 3 * groups) * d * b / t,
            "attention output": heads * d * b / t,
            "softmax log-sum-exp (fp32)": heads * FP32 / t,
            "SwiGLU input (fc1 output) and output": 3 * shape.intermediate * b / t,
        }
        if shape.qk_norm:
            terms["q and k RMSNorm input and statistics (per head)"] = (heads + groups) * (d * b + FP32) / t
        if layout.recompute == "selective":
            del terms["softmax log-sum-exp (fp32)"]
        return terms
    if layout.recompute == "selective":
        raise ValueError("the local layer spec's selective recompute is not modelled (use none or full)")
    norm = (2 * shape.hidden + 1) * FP32 + shape.hidden * b
    terms = {
        "RMSNorm fp32 input, statistics, normalized and output (x2)": 2 * norm,
        "q, k and v repeated to every head, attention output": 4 * heads * d * b / t,
        "SwiGLU: fc1 output, silu, linear half, product": 5 * shape.intermediate * b / t,
    }
    if shape.qk_norm:
        # In an fp32 model k's norm saves its input as a view of the fused QKV output, which keeps all of it.
        fused_qkv_view = (heads + groups) * d * FP32 if b == FP32 else 0
        terms["q and k RMSNorm fp32 input, statistics, normalized"] = ((heads + groups) * (2 * d + 1) * FP32
                                                                       + fused_qkv_view) / t  # fmt: skip
    return terms  # fmt: skip


def _row_terms(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """Bytes one layer saves per micro-batch beyond its per-token terms: the rotary cos/sin of the unfused RoPE and
    the unfused attention's probabilities (fp32, plus a model-dtype copy in 16-bit models)."""
    if layout.spec == "te":
        return 0.0
    b = layout.dtype_bytes
    rotary = 4 * shape.head_dim * b * micro_batch.row_length
    probability_bytes = FP32 + (b if b != FP32 else 0)
    return rotary + shape.heads * micro_batch.row_length**2 * probability_bytes * micro_batch.rows / layout.tensor


def layer_activation_bytes(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """What one layer keeps for one micro-batch without recompute."""
    return sum(layer_terms(shape, layout).values()) * micro_batch.tokens + _row_terms(shape, layout, micro_batch)


def saved_per_layer(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """What one layer keeps for one micro-batch under the configured recompute: its input only under `full`."""
    if layout.recompute == "full":
        return shape.hidden * layout.dtype_bytes * micro_batch.tokens / layout.norm_split
    return layer_activation_bytes(shape, layout, micro_batch)


def head_saved_bytes(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """What the last stage keeps beyond its layers: the final norm, the LM head's input rows, the loss's tensors,
    and the position-independent inputs (token ids; the local spec's causal mask; the fused RoPE's frequencies)."""
    b, tokens, response = layout.dtype_bytes, micro_batch.tokens, micro_batch.response_tokens
    if layout.spec == "te":
        final_norm = (shape.hidden * b + FP32) * tokens / layout.norm_split
        inputs = 8 * tokens + FP32 * shape.head_dim * tokens
    else:
        final_norm = (2 * shape.hidden + 1) * FP32 * tokens
        inputs = 8 * tokens + micro_batch.row_length**2
    return final_norm + response * shape.hidden * b + LOSS_BYTES_PER_TOKEN * response + inputs


def logprob_workspace_bytes(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """Peak extra bytes of the LM-head logprob backward on the last stage: the fused kernel recomputes logits one
    [chunk, V/TP] block at a time and never holds [T, V/TP]; the LM-head gradient is built in fp32 and cast."""
    b, hidden, response = layout.dtype_bytes, shape.hidden, micro_batch.response_tokens
    vocab_shard = shape.padded_vocab(layout.tensor) // layout.tensor
    if layout.spec == "local":
        blocks = 3 * min(response, CPU_TOKEN_CHUNK) * min(vocab_shard, CPU_VOCAB_CHUNK) * FP32
        return blocks + vocab_shard * hidden * FP32 + response * hidden * FP32
    by_budget = max(128, LOGPROB_CHUNK_BUDGET // (vocab_shard * b) // 128 * 128)
    chunk = min(response, LOGPROB_CHUNK_TOKENS, by_budget)
    weight_grad = vocab_shard * hidden * (FP32 + b if response > chunk else b)
    gathered = micro_batch.tokens * hidden * b if layout.sequence_parallel else 0
    return chunk * vocab_shard * b + weight_grad + response * hidden * b + gathered


def backward_transient_bytes(shape: ModelShape, layout: TrainerLayout, micro_batch: MicroBatchShape) -> float:
    """The layer backward's working set beyond what is saved: the gradients of one layer's activations (about the
    size of the activations), plus, under full recompute, that layer's activations re-run; the local spec's
    unfused attention adds two [heads, s, s] fp32 gradients per row."""
    layer = layer_activation_bytes(shape, layout, micro_batch)
    transient = layer * (2 if layout.recompute == "full" else 1)
    if layout.spec == "local":
        rows = micro_batch.rows * micro_batch.row_length**2
        transient += 2 * shape.heads * rows * FP32 / layout.tensor
    return transient
