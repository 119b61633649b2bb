"""§8.5's background-noise augmentation: HuBERT of the clip's audio with noise at a set SNR.

HuBERT features are computed from the waveform, so noise has to enter there: the clip's wav
(``FeatureClip.audio_path``, the one its features came from) gets white Gaussian noise scaled
to ``snr_db`` (15 dB in the seed), runs through **the HuBERT that made the clip's features**
(the model path, layer and frame rate recorded in the ``hubert`` file's header) and is
aligned to the video frames by the features stage's own rule
(:func:`models.hubert.align_audio_steps`). Trade-off, stated: one noisy realisation per clip
is computed when the training data is loaded (re-running HuBERT per sample would dominate
the step), seeded by the clip id, and a sample uses it instead of the clean features with
probability ``p_noise``; real background recordings (babble, street) are not available
offline, so the noise is white.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch

from generators.io import read_metadata
from generators.musetalk2.data import read_wav
from models.hubert import (
    align_audio_steps,
    extract_hubert_windowed,
    load_hubert,
    make_feature_extractor,
)


def add_noise_at_snr(waveform: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``waveform + a·noise`` with ``a`` such that the signal-to-noise ratio is ``snr_db``."""
    noise = np.resize(noise, waveform.shape).astype(np.float64)
    p_signal = float(np.mean(waveform.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise**2))
    if p_noise == 0:
        raise ValueError("noise has zero power")
    scale = np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))
    return (waveform + scale * noise).astype(waveform.dtype)


@lru_cache(maxsize=2)
def _hubert(path: str):
    return load_hubert(path), make_feature_extractor()


def noisy_hubert(
    clip_id: str, hubert_path: str, wav_path: str, num_frames: int, snr_db: float
) -> torch.Tensor:
    """``(num_frames, steps, D)`` HuBERT features of the clip's wav plus noise at ``snr_db``."""
    meta = read_metadata(hubert_path)
    try:
        model_path = json.loads(meta["model_fingerprint"])["resolved_path"]
        layer, fps = int(meta["layer"]), float(meta["fps"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{clip_id}: the hubert file does not record its model ({exc})") from None
    if not model_path:
        raise ValueError(f"{clip_id}: the hubert features' model has no local path")
    wave = read_wav(wav_path)
    seed = int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "little")
    noise = np.random.default_rng(seed).standard_normal(len(wave))
    model, fe = _hubert(model_path)
    with torch.inference_mode():
        feats = extract_hubert_windowed(model, fe, add_noise_at_snr(wave, noise, snr_db), layer)
    return torch.from_numpy(align_audio_steps(feats, num_frames, fps)).float()
