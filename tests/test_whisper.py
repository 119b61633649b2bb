"""Whisper features (MuseTalk 1.5's audio input): a tiny random WhisperModel built from a
config and loaded back through the real loader; 50 Hz framing; 30 s segments; the features
stage's ``whisper.safetensors`` (two steps per video frame, every hidden state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.registry import ModelSpec, ensure_model, fingerprint
from models.whisper import extract_whisper, load_whisper, whisper_num_steps
from storage.store import ArtifactStore
from tests.features_helpers import commit_clip, make_features_stage, run_item

SR = 16_000
SPEC = ModelSpec(family="whisper", source="models/whisper-tiny", tiny_random=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    path = ensure_model(SPEC, root)
    assert fingerprint(SPEC, root).origin == "random-init"
    return load_whisper(path)


def _tone(n: int, start_s: float, dur_s: float, hz: float, amp: float) -> np.ndarray:
    out = np.zeros(n, np.float32)
    a, b = int(start_s * SR), int((start_s + dur_s) * SR)
    out[a:b] = amp * np.sin(2 * np.pi * hz * np.arange(b - a) / SR)
    return out


def test_every_hidden_state_at_50_hz_with_local_framing(whisper):
    model, extractor = whisper
    n = 3 * SR + 123
    base = _tone(n, 2.0, 0.2, 440.0, 0.5) + 1e-3 * np.random.default_rng(0).standard_normal(n)
    feats = extract_whisper(model, extractor, base)
    assert feats.shape == (whisper_num_steps(n), 3, 32) == (151, 3, 32)  # embeddings + 2 layers
    # a quieter burst at 1.00-1.10 s changes the front end's output (hidden state 0) only at
    # the 50 Hz steps around 50..55: step k covers [20k, 20k + 20) ms
    burst = extract_whisper(model, extractor, base + _tone(n, 1.0, 0.1, 300.0, 0.05))
    changed = np.flatnonzero(np.abs(burst[:, 0] - feats[:, 0]).max(axis=1) > 1e-4)
    assert changed.size and changed.min() >= 47 and changed.max() <= 58, changed


def test_long_audio_runs_in_30_s_segments(whisper):
    model, extractor = whisper
    n = 31 * SR + 500
    wave = 0.1 * np.random.default_rng(1).standard_normal(n).astype(np.float32)
    feats = extract_whisper(model, extractor, wave, batch_size=2)
    assert len(feats) == whisper_num_steps(n) == 1500 + 52
    first = extract_whisper(model, extractor, wave[: 30 * SR])
    np.testing.assert_allclose(feats[:1500], first, atol=1e-5)
    tail = extract_whisper(model, extractor, wave[30 * SR :])
    np.testing.assert_allclose(feats[1500:], tail, atol=1e-5)


def test_features_stage_writes_two_steps_per_frame_of_every_hidden_state(tmp_path, whisper):
    stage = make_features_stage(
        tmp_path, whisper=SPEC, motion=None, flame=None, sensevoice=None, reference=None
    )
    assert SPEC in stage.model_specs() and "whisper" in stage.pools
    inputs = commit_clip(tmp_path, "clip-w", num_frames=16, size_px=64)
    rec, _ = run_item(stage, tmp_path, inputs)
    wf = rec.file("whisper")
    assert wf.shape == [16, 2, 3, 32] and wf.dtype == "float16"
    assert wf.model.origin == "random-init" and wf.frame_rate_hz == 25.0
    path = ArtifactStore(str(tmp_path / "store"))._path(wf.artifact.uri)
    with safe_open(path, framework="pt") as f:
        stored = f.get_tensor("features").float().numpy()
        assert "every encoder hidden state" in f.metadata()["layout"]
    from tasks.media import read_wav

    wave, _ = read_wav(ArtifactStore(str(tmp_path / "store"))._path(rec.audio.uri))
    model, extractor = load_whisper(ensure_model(SPEC, tmp_path))
    direct = extract_whisper(model, extractor, wave)
    expected = direct[np.minimum(np.arange(32), len(direct) - 1)].reshape(16, 2, 3, 32)
    np.testing.assert_allclose(stored, expected, atol=2e-3 * np.abs(expected).max())
    assert torch.isfinite(torch.from_numpy(stored)).all()
