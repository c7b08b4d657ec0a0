"""The CPU shims: every patched megatron-core name exists, and the shims make Megatron's CUDA paths run on CPU."""

import importlib

import pytest
import torch

from guide_mega.training import cpu_compat


@pytest.mark.parametrize(("module_name", "attribute"), cpu_compat.PATCHED_NAMES)
def test_megatron_still_has_every_patched_name(module_name, attribute):
    """Fails loudly when a megatron-core release renames something the shims replace."""
    module = importlib.import_module(module_name)
    assert hasattr(module, attribute), f"megatron-core renamed {module_name}.{attribute}: update cpu_compat.py"


def test_checkpoint_loading_relies_on_megatrons_dummy_optimizer_state():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert hasattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims only apply without CUDA")
def test_shims_make_cuda_allocations_land_on_cpu():
    assert cpu_compat.apply_cpu_shims()
    assert cpu_compat.apply_cpu_shims(), "applying twice is a no-op"
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    with get_cuda_rng_tracker().fork():
        pass
    with cpu_compat._cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
