"""`guide-mega plan`: every shipped config fits its cluster, an oversized one names the phase, the exit codes, the
model table against transformers' own parameter counts, and docs/parallel_layouts.md against the current output.
(The plan's numbers against measured tensors and activations: tests/training/test_memory_plan.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from guide_mega.cli import PLAN_DOES_NOT_FIT, main
from guide_mega.config import load_config
from guide_mega.planning import KNOWN_MODELS, format_plan, model_shape, overflow_message, plan_memory
from guide_mega.planning.architectures import ModelShape, read_model_shape
from guide_mega.planning.memory import GIB

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIG_72B = str(REPO / "configs" / "qwen2.5_72b_guide_grpo.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_fits_and_every_gpu_generates(path, capsys):
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("plan: fits")
    config = load_config(path)
    plan = plan_memory(config, model_shape(config.model.path))
    assert all(phase.headroom >= 0 for phase in plan.phases)
    if config.rollout.engine == "sglang":
        assert plan.engine.gpus == plan.world_size, "a GPU that never generates"
        assert plan.engine.sequences_per_engine >= 32


def test_72b_with_one_gpu_engines_does_not_fit_and_names_the_phase(capsys):
    assert main(["plan", "--config", CONFIG_72B, "rollout.tensor_parallel=1"]) == PLAN_DOES_NOT_FIT == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.match(r"plan: colocated generation phase \(stage \d of 4\) needs \d+\.\d GiB per GPU, 79\.6 available "
                    r"\(engine weights \(TP 1\) 135\.4 GiB", err[0]), err[0]  # fmt: skip


def test_a_kv_cache_too_small_for_one_sequence_does_not_fit(capsys):
    argv = ["plan", "--config", CONFIG_72B, "--nodes", "8", "rollout.sglang_mem_fraction=0.2"]
    assert main(argv) == PLAN_DOES_NOT_FIT
    assert "KV cache gets" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["parallel.tensor=3"], "does not divide the cluster's 32 GPUs"),
        (["--nodes", "3", "parallel.tensor=8", "parallel.pipeline=3"], "does not divide qwen2.5-72b's 80 layers"),
        (["rollout.tensor_parallel=3"], "rollout.tensor_parallel=3 does not divide"),
        (["model.path=/nowhere/MyModel"], "has no readable config.json"),
        (["--arch", "gpt-5"], "unknown architecture"),
        (["cluster.nodes=0"], "cluster.nodes: must be >= 1"),
    ],
)
def test_bad_configs_exit_2_with_the_reason(arguments, message, capsys):
    assert main(["plan", "--config", CONFIG_72B, *arguments]) == 2
    assert message in capsys.readouterr().err


def test_cluster_flags_override_the_cluster_section(capsys):
    assert main(["plan", "--config", CONFIG_72B, "--nodes", "8", "rollout.sglang_mem_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert "on 8 nodes x 8 GPUs" in out and "TP 8 x PP 4 x DP 2" in out and "8 SGLang engines x TP 8" in out


def test_separate_servers_plan_trainer_gpus_and_server_gpus():
    urls = "rollout.sglang_urls=[http://a:30000,http://b:30000]"
    config = load_config(CONFIG_72B, [urls, "train.colocate=false", "rollout.sglang_mem_fraction=0.8"])
    plan = plan_memory(config, model_shape(config.model.path))
    assert [phase.name for phase in plan.phases] == ["weight sync", "training", "generation"]
    assert (plan.engine.count, plan.engine.gpus) == (2, 16)
    assert not any(name.startswith("engine") for name in plan.phases[1].components)
    assert plan.phases[2].where == "server GPU" and overflow_message(plan) is None


def _hf_config(shape: ModelShape):
    sizes = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                 num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                 tie_word_embeddings=shape.tied)  # fmt: skip
    if shape.qk_norm:
        return Qwen3Config(**sizes, head_dim=shape.head_dim)
    return Qwen2Config(**sizes) if shape.qkv_bias else LlamaConfig(**sizes, head_dim=shape.head_dim)


@pytest.mark.parametrize("name", list(KNOWN_MODELS))
def test_known_models_count_the_parameters_transformers_builds(name):
    shape = KNOWN_MODELS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(shape))
    assert shape.num_params() == sum(param.numel() for param in model.parameters())


def test_config_json_wins_over_the_table_and_its_name(tmp_path):
    checkpoint = tmp_path / "Qwen2.5-72B"
    checkpoint.mkdir()
    sizes = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4}
    Qwen3Config(**sizes, num_key_value_heads=2, head_dim=24, vocab_size=301).to_json_file(checkpoint / "config.json")
    shape = model_shape(str(checkpoint))
    assert shape == read_model_shape(checkpoint / "config.json") and shape.source.endswith("config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config.from_json_file(checkpoint / "config.json"))
    assert shape.num_params() == sum(param.numel() for param in model.parameters())
    assert model_shape("/models/Qwen2.5-72B-Instruct") is KNOWN_MODELS["qwen2.5-72b"]


def test_engine_weights_and_kv_cache_per_gpu():
    shape = KNOWN_MODELS["qwen2.5-72b"]
    assert shape.kv_bytes_per_token(8) == 2 * 80 * 1 * 128 * 2  # one KV head per GPU at TP 8
    assert KNOWN_MODELS["qwen2.5-math-7b"].kv_bytes_per_token(8) == 2 * 28 * 1 * 128 * 2  # 4 KV heads, replicated
    config = load_config(CONFIG_72B)
    plan = plan_memory(config, shape)
    assert plan.engine.weights == pytest.approx(shape.num_params() * 2 / 8, rel=1e-3)  # norms are replicated
    assert plan.engine.kv_cache == pytest.approx(0.35 * 79.6 * GIB - plan.engine.weights)


def _doc_blocks() -> dict[str, str]:
    text = (REPO / "docs" / "parallel_layouts.md").read_text()
    pattern = r"<!-- guide-mega plan --config (\S+)((?: \S+)*) -->\n```text\n(.*?)\n```"
    return {f"{path}{arguments}": block for path, arguments, block in re.findall(pattern, text, flags=re.S)}


def test_parallel_layouts_doc_shows_the_current_plans():
    blocks = _doc_blocks()
    assert {key.split()[0] for key in blocks} >= {"configs/qwen2.5_72b_guide_grpo.yaml",
                                                  "configs/qwen2.5_32b_guide_grpo.yaml",
                                                  "configs/qwen2.5-math-7b_guide_grpo.yaml"}  # fmt: skip
    for key, block in blocks.items():
        path, *overrides = key.split()
        config = load_config(REPO / path, overrides)
        plan = plan_memory(config, model_shape(config.model.path))
        expected = format_plan(plan, path) + "\n" + (overflow_message(plan) or "plan: fits")
        assert block == expected, f"docs/parallel_layouts.md is stale for {key}: paste `guide-mega plan --config {key}`"
