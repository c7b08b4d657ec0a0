"""A preallocated KV cache of fixed-width decode slots, for HFEngine's continuous batching.

Shape legend: L model layers, Z = 2 (keys, values), W slots, A running slots (always the first A), H key/value
heads, C cache columns, K attended columns, D head dimension, N prefix tokens, Q = 1 query position.

Every running slot writes its new key/value at the same column each step, so a step is one indexed write per
layer instead of transformers' DynamicCache concatenation (a copy of the whole cache per layer per step). A slot's
history occupies the columns [start, column): a request entering a slot has its prompt prefix copied in so that it
ends at the current column, and the attention mask hides every column of the slot before its start (an earlier
occupant's). When the columns run out, the live window is moved back to the front (every `slack` steps at most).
The model sees this object as its cache: it only calls `update`, and a 4D attention mask passes through
transformers' mask construction unchanged.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Keys and values of W slots: kv_LZWHCD [L, 2, W, H, C, D], the slots' start columns, and the write column."""

    def __init__(self, *, layers: int, width: int, heads: int, head_dim: int, prefix_tokens: int, max_new: int,
                 slack: int, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        """Room for any slot's history (a prefix of at most `prefix_tokens` and up to `max_new` decoded tokens)
        plus `slack` columns, so that compaction happens at most every `slack` steps."""
        self.prefix_tokens = prefix_tokens
        columns = prefix_tokens + max_new + slack
        # Zeros, not empty: masked columns still enter attention's products (times a zero weight), so they must
        # hold finite values; an earlier occupant's are finite, uninitialized memory may not be.
        self.kv_LZWHCD = torch.zeros((layers, 2, width, heads, columns, head_dim), dtype=dtype, device=device)
        self.start_W = [0] * width
        self.column = prefix_tokens
        self.running = 0

    def update(self, key_AHQD: torch.Tensor, value_AHQD: torch.Tensor, layer_idx: int, **_) -> tuple:
        """Write one step's keys and values [A, H, 1, D] at the current column; return the attended window of the
        running slots, keys and values [A, H, K, D] (views, no copy)."""
        running, column, window = self.running, self.column, self.window_start()
        keys_WHCD, values_WHCD = self.kv_LZWHCD[layer_idx]
        keys_WHCD[:running, :, column] = key_AHQD[:, :, 0]
        values_WHCD[:running, :, column] = value_AHQD[:, :, 0]
        return keys_WHCD[:running, :, window : column + 1], values_WHCD[:running, :, window : column + 1]

    def window_start(self) -> int:
        return min(self.start_W[: self.running])

    def attention_mask(self) -> torch.Tensor:
        """[A, 1, 1, K] bool: which columns of the window each running slot attends to (its own, up to and
        including the one this step writes)."""
        window = self.window_start()
        columns_K = torch.arange(window, self.column + 1, device=self.kv_LZWHCD.device)
        start_A = torch.tensor(self.start_W[: self.running], device=self.kv_LZWHCD.device)
        return (columns_K[None, :] >= start_A[:, None])[:, None, None, :]

    def admit(self, slot: int, prefix_LZHND: torch.Tensor) -> None:
        """Give `slot` a new history: the prefix's keys and values, ending at the current column (N may be 0)."""
        tokens = prefix_LZHND.shape[3]
        self.start_W[slot] = self.column - tokens
        if tokens:
            self.kv_LZWHCD[:, :, slot, :, self.column - tokens : self.column] = prefix_LZHND

    def move(self, source: int, target: int) -> None:
        """Copy slot `source`'s history into slot `target` (to keep the running slots first)."""
        start = self.start_W[source]
        self.kv_LZWHCD[:, :, target, :, start : self.column] = self.kv_LZWHCD[:, :, source, :, start : self.column]
        self.start_W[target] = start

    def advance(self) -> None:
        """After a step: the next step writes one column further; compact first when the columns run out."""
        self.column += 1
        if self.column == self.kv_LZWHCD.shape[4]:
            self._compact()

    def _compact(self) -> None:
        # The live window [window, column) moves to the front, keeping at least `prefix_tokens` columns before the
        # write column so that any prompt prefix can still be admitted.
        window = self.window_start() if self.running else self.column
        span = self.column - window
        shift = window - max(self.prefix_tokens - span, 0)
        running = self.running
        live = self.kv_LZWHCD[:, :, :running, :, window : self.column].clone()
        self.kv_LZWHCD[:, :, :running, :, window - shift : self.column - shift] = live
        self.start_W = [start - shift for start in self.start_W]
        self.column -= shift
