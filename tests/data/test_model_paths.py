"""model.path forms: a hub id resolves from the local HF cache (no network), else a clear error; local paths and
embedded names as before."""

import pytest
from huggingface_hub import constants

from guide_mega.data.embedded_model import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(cache, repo_id: str):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_cached_hub_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _cache_with(tmp_path, "SomeOrg/tiny-model")
    assert resolve_model_path("SomeOrg/tiny-model") == snapshot


def test_an_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"model.path: 'SomeOrg/absent' is not a local directory and not in the local"):
        resolve_model_path("SomeOrg/absent")


def test_an_existing_local_path_wins_over_the_hub_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert str(resolve_model_path("models/mine")) == "models/mine"
    assert str(resolve_model_path("/abs/not/a/hub/id")) == "/abs/not/a/hub/id"
