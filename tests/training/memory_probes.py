"""Measure what the memory plan predicts, on the tiny models: the bytes of a policy's weights, gradient buffer and
optimizer state, the activations a micro-batch saves for its backward, and the peak of live tensor bytes.

Also a torchrun entry point (one JSON file of state bytes per rank, for TP = 2, PP = 2 and DP = 2 in turn):
    python -m torch.distributed.run --nproc-per-node 2 -m tests.training.memory_probes OUT_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))

from guide_mega.types import TrainBatch  # noqa: E402

# name -> (tensor, pipeline) under two processes; the rest is data parallelism.
TWO_PROCESS_LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


def state_tensor_bytes(policy) -> dict[str, int]:
    """Bytes this rank holds: parameters, the fp32 main gradients (unpadded, and the whole padded buffer), and the
    optimizer's own tensors (fp32 main weights not sharing a parameter's storage, Adam's moments)."""
    from guide_mega.training.optimizer import inner_optimizers

    params = list(policy.module.parameters())
    own = {param.untyped_storage().data_ptr() for param in params}
    main_params = moments = 0
    for optimizer in inner_optimizers(policy.runner.optimizer):
        for group in optimizer.optimizer.param_groups:
            for main in group["params"]:
                if main.untyped_storage().data_ptr() not in own:
                    main_params += main.numel() * main.element_size()
        for state in optimizer.optimizer.state.values():
            moments += sum(state[key].numel() * state[key].element_size() for key in ("exp_avg", "exp_avg_sq"))
    buffers = policy.runner.model[0].buffers
    return {
        "weights": sum(param.numel() * param.element_size() for param in params),
        "gradients": sum(param.main_grad.numel() * 4 for param in params if param.requires_grad),
        "gradient_buffer": sum(buffer.grad_data.numel() * buffer.grad_data.element_size() for buffer in buffers),
        "optimizer": main_params + moments,
    }


def rows_batch(rows: int, prompt: int, response: int, *, vocab: int = 301, seed: int = 0) -> TrainBatch:
    """`rows` sequences with distinct prompts of `prompt` tokens and responses of `response` tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt,), generator=generator).tolist() for _ in range(rows)]
    return TrainBatch(
        train_prompt_ids=prompts,
        sampled_prompt_ids=prompts,
        response_ids_T=torch.randint(0, vocab, (rows * response,), generator=generator),
        cu_seqlens_S1=torch.arange(rows + 1) * response,
        is_guided_S=torch.zeros(rows, dtype=torch.bool),
        rewards_S=torch.rand(rows, generator=generator),
        group_ids_S=torch.arange(rows),
        hint_level_S=torch.full((rows,), -1),
    )


class SavedTensorBytes:
    """saved_tensors_hooks pair that sums the distinct storages autograd saves, parameters' storages excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.storages = exclude, {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates inside the mode until it is freed; `peak` is the maximum.
    (torch's CPU allocator keeps no statistics, and the profiler records no CPU allocations here.)"""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._tracked:
                    self._tracked.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return output


def run_layouts(out_dir: Path, checkpoint_dir: str) -> None:
    """Per layout and dtype, after one training step (Adam's moments exist): this rank's state bytes."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from policy_probes import make_policy, train_step
    from tiny_models import make_train_batch

    from guide_mega.training.distributed import destroy_parallel

    records = []
    for name, (tensor, pipeline) in TWO_PROCESS_LAYOUTS.items():
        for dtype in ("float32", "bfloat16"):
            # A new layout needs new model-parallel groups; the process group stays (re-creating it under
            # torchrun would wait for a rendezvous that never comes).
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            policy = make_policy(checkpoint_dir, tensor=tensor, pipeline=pipeline, dtype=dtype)
            train_step(policy, make_train_batch())
            where = {"layout": name, "dtype": dtype, "tensor": tensor, "pipeline": pipeline}
            where |= {"data": policy.layout.data, "stage": policy.layout.pipeline_rank}
            records.append({**where, **state_tensor_bytes(policy)})
    rank = dist.get_rank()
    destroy_parallel()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    run_layouts(Path(sys.argv[1]), sys.argv[2])
