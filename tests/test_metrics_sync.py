"""Sync-C / Sync-D / AV offset (metrics.sync): the reference scoring and the offset search.

- Sync-C/D on a constructed per-lag distance matrix, computed the syncnet_python way.
- The crop geometry of syncnet_python's ``crop_video``.
- On a real fixture clip (skipped without ``../shared/fixtures/clips``): a SyncNet whose
  weights are random except the lip head's bias (centring its embeddings) and the audio
  head's last layer, fitted by least squares so that the
  clip's aligned audio windows embed onto its lip windows. Delaying the audio by ``k`` frames
  must then move the argmin lag by exactly ``k`` (the search, the MFCC framing and the
  windowing all have to be right for that).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from metrics.sync import SyncNetScorer, syncnet_crop_affines
from models.registry import ModelSpec, ensure_model
from models.syncnet import mfcc, mfcc_windows, sync_scores
from models.syncnet_spec import LIP_FRAMES
from tasks.media import iter_frames, probe, read_wav
from tests.faces_helpers import real_clips

RATE = 16_000
SAMPLES_PER_FRAME = 640


def test_sync_scores_follow_the_reference_on_a_constructed_matrix():
    rng = np.random.default_rng(0)
    n, d, true_lag = 40, 8, 4
    audio = rng.normal(size=(n, d))
    lip = np.zeros_like(audio)
    lip[: n - true_lag] = audio[true_lag:]  # lip[i] matches audio[i + 4]: audio lags by 4
    lip += rng.normal(scale=0.05, size=lip.shape)
    s = sync_scores(lip, audio, vshift=15)
    # the reference: dists[i][k] = ‖lip[i] − audio_padded[i + k]‖, mean over i, per lag
    padded = np.vstack([np.zeros((15, d)), audio, np.zeros((15, d))])
    dists = np.array(
        [[np.linalg.norm(lip[i] - padded[i + k]) for k in range(31)] for i in range(n)]
    )
    mean = dists.mean(axis=0)
    np.testing.assert_allclose(s.mean_distance, mean)
    assert s.offset_frames == int(np.argmin(mean)) - 15 == true_lag
    assert s.sync_d == pytest.approx(mean.min())
    assert s.sync_c == pytest.approx(np.median(mean) - mean.min())
    assert s.sync_c > 0.5  # a clear minimum


def test_crop_geometry_follows_crop_video():
    m = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
    a = syncnet_crop_affines(m, np.array([[40.0, 20, 140, 120]]))[0]
    np.testing.assert_allclose(a @ [90, 20, 1], [112, 0])  # box top centre → top centre
    np.testing.assert_allclose(a @ [90, 120, 1], [112, 224 / 1.4])
    half = syncnet_crop_affines(0.5 * m, np.array([[40.0, 20, 140, 120]]))[0]
    np.testing.assert_allclose(half @ [45, 10, 1], [112, 0])  # follows the source→crop map


def _decode(path: Path, size: int) -> np.ndarray:
    info = probe(path)
    frames = np.concatenate(list(iter_frames(path, info.width, info.height, fps=25)))
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def _delayed(samples: np.ndarray, frames: int) -> np.ndarray:
    out = np.zeros_like(samples)
    s = frames * SAMPLES_PER_FRAME
    if s >= 0:
        out[s:] = samples[: len(samples) - s]
    else:
        out[:s] = samples[-s:]
    return out


@pytest.mark.skipif(not real_clips(), reason="no ../shared/fixtures/clips")
def test_audio_shift_moves_the_argmin_offset_by_the_shift(tmp_path):
    clip = next(p for p in real_clips() if abs(probe(p).fps - 25) < 0.01)
    wav = tmp_path / "a.wav"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(clip), "-ac", "1", "-ar", str(RATE), str(wav)],
        check=True,
    )
    samples, rate = read_wav(wav)
    frames = _decode(clip, 224)
    weights = ensure_model(ModelSpec(family="syncnet", source="sn", tiny_random=True), tmp_path)
    scorer = SyncNetScorer(weights, batch_windows=16)
    count = min(len(frames), len(samples) * 25 // rate) - LIP_FRAMES
    assert count > 60
    affines = np.tile(np.eye(2, 3), (len(frames), 1, 1))  # frames are already 224 px faces
    lips = scorer.lip_embeddings(iter(frames), affines, count)
    # centre the lip embeddings (lip head bias), so that they differ between windows by as
    # much as their norm: a random net's embeddings are a large constant plus small changes
    net = scorer.model
    with torch.no_grad():
        net.netfclip[-1].bias -= torch.from_numpy(lips.mean(axis=0)).float()
    lips = scorer.lip_embeddings(iter(frames), affines, count)

    # fit the audio head's last layer: aligned audio windows → the lip embeddings
    with torch.inference_mode():
        x = mfcc_windows(mfcc(samples, rate), count)
        hidden = net.netfcaud[:-1](net.netcnnaud(x).flatten(1)).double()
    design = torch.cat([hidden, torch.ones(count, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, torch.from_numpy(lips).double()).solution
    with torch.no_grad():
        net.netfcaud[-1].weight.copy_(sol[:-1].T.float())
        net.netfcaud[-1].bias.copy_(sol[-1].float())

    base = sync_scores(lips, scorer.audio_embeddings(samples, count), 15)
    assert base.offset_frames == 0
    for k in (3, -3, 7):
        shifted = sync_scores(lips, scorer.audio_embeddings(_delayed(samples, k), count), 15)
        assert shifted.offset_frames == k, (k, shifted.mean_distance)
        assert shifted.sync_c > 0
    # the whole-clip entry point agrees with the pieces
    est = scorer.measure(iter(frames), affines, _delayed(samples, 3), rate, 25.0)
    assert est.offset_frames == 3 and est.offset_ms == pytest.approx(120.0)
    assert est.confidence > 0 and not est.unmeasurable
