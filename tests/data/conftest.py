"""Data-test fixtures: the embedded SmolLM2 model (converted once into the guide_mega cache) and its tokenizer."""

import pytest

from guide_mega.data.embedded_model import ensure_embedded_model


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted HF directory; the first session on a machine pays the GGUF conversion (~30 s on 2 cores)."""
    return ensure_embedded_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
