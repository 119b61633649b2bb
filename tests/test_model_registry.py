"""Model fingerprints: stable, content-derived, labelled with their origin."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import ModelSpec, ModelUnavailableError, fingerprint


def test_fingerprint_is_stable_and_tracks_weight_bytes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    spec = ModelSpec(family="vae-flux1", source=str(weights))
    first = fingerprint(spec, tmp_path)
    assert fingerprint(spec, tmp_path).sha256 == first.sha256  # the hash cache changes nothing
    (weights / ".notes.json").write_text("{}")  # hidden files are not weights
    assert fingerprint(spec, tmp_path).sha256 == first.sha256
    assert first.origin == "pretrained"
    (weights / "model.safetensors").write_bytes(b"\x01" * 64)
    assert fingerprint(spec, tmp_path).sha256 != first.sha256


def test_tiny_random_models_are_built_once_and_labelled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = ModelSpec(family="vae-flux1", source="models/vae-tiny", tiny_random=True)
    fp = fingerprint(spec, tmp_path)
    assert fp.origin == "random-init"
    assert Path(fp.resolved_path) == tmp_path / "models" / "vae-tiny"
    assert fingerprint(spec, tmp_path).sha256 == fp.sha256  # not rebuilt


def test_missing_real_weights_fail_with_a_fix(tmp_path: Path) -> None:
    spec = ModelSpec(family="vae-flux1", source=str(tmp_path / "nowhere"))
    with pytest.raises(ModelUnavailableError, match="tiny_random"):
        fingerprint(spec, tmp_path)
