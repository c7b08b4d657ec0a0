"""HF -> Megatron -> HF: the export reproduces the checkpoint, re-imports bit for bit, and loads in transformers."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from guide_mega.training.architecture import read_architecture
from guide_mega.training.weight_conversion import from_megatron, shard, to_megatron, weight_rule

FAMILIES = ("llama", "qwen2", "qwen3")


@pytest.mark.parametrize("tensor_parallel", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_round_trip_is_exact(family, tensor_parallel, tiny_checkpoints, single_process_megatron):
    """Every layer rule: HF tensors -> full Megatron tensor -> shards -> concatenated -> HF tensors, unchanged."""
    from guide_mega.training.architecture import transformer_config
    from guide_mega.training.distributed import init_parallel
    from guide_mega.training.model import build_gpt_model

    arch = read_architecture(tiny_checkpoints[family])
    hf_tensors = load_file(tiny_checkpoints[family] / "model.safetensors")
    config = transformer_config(
        arch, tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False, dtype=torch.float32,
        use_cpu_initialization=True,
    )  # fmt: skip
    names = [name for name, _ in build_gpt_model(arch, config, init_parallel()).named_parameters()]
    covered = set()
    for name in names:
        rule = weight_rule(name, arch)
        full = to_megatron(rule, [hf_tensors[n] for n in rule.hf_names], arch, tensor_parallel=tensor_parallel)
        shards = [shard(full, rule, tensor_parallel=tensor_parallel, tensor_rank=r) for r in range(tensor_parallel)]
        rebuilt = full if rule.tp_dim is None else torch.cat(shards, dim=rule.tp_dim)
        for hf_name, tensor in zip(
            rule.hf_names, from_megatron(rule, rebuilt, arch, tensor_parallel=tensor_parallel), strict=True
        ):
            assert torch.equal(tensor, hf_tensors[hf_name]), f"{family} TP={tensor_parallel}: {hf_name} via {name}"
            covered.add(hf_name)
    assert covered == set(hf_tensors), f"{family}: HF tensors without a rule: {set(hf_tensors) - covered}"


def test_single_process_export_matches_checkpoint(tiny_checkpoints, single_process_megatron):
    """Exported tensors equal the HF checkpoint exactly; a tied model exports no lm_head."""
    from policy_probes import make_policy

    for family, checkpoint_dir in tiny_checkpoints.items():
        hf_tensors = load_file(checkpoint_dir / "model.safetensors")
        exported = dict(make_policy(checkpoint_dir).export_hf_weights(bucket_bytes=4096))
        assert set(exported) == set(hf_tensors), family
        for name, tensor in exported.items():
            assert torch.equal(tensor, hf_tensors[name]), f"{family}: {name}"


def test_export_buckets_respect_the_size_bound(tiny_checkpoints, single_process_megatron):
    from policy_probes import make_policy

    from guide_mega.training.weight_export import iter_hf_weight_buckets

    policy = make_policy(tiny_checkpoints["qwen3"])
    bound = 40_000
    buckets = list(iter_hf_weight_buckets(policy.module, policy.arch, policy.layout, bucket_bytes=bound))
    assert len(buckets) > 1
    for bucket in buckets:
        sizes = [tensor.nbytes for _, tensor in bucket]
        assert sum(sizes) <= bound or len(bucket) == 1


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_export_reimports_bit_exact_and_loads_in_transformers(family, layout_results, tiny_checkpoints):
    results = layout_results.load(family)
    assert results["reimport_bit_exact"], f"{layout_results.name} {family}: re-import changed a parameter"
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).eval()
    exported = AutoModelForCausalLM.from_pretrained(layout_results.out_dir / f"{family}_hf").eval()
    for (name, tensor), (_, exported_tensor) in zip(
        original.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, exported_tensor), f"{layout_results.name} {family}: {name}"
    input_ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(original(input_ids).logits, exported(input_ids).logits)
