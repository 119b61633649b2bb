"""Audio measures for the quality stage: speech share and SNR with Silero VAD.

Silero VAD (``silero-vad`` 6.2.3, MIT) ships its weights in the wheel, so this runs offline
with the real model. ``audio_forward`` gives one speech probability per 512-sample window
(32 ms at 16 kHz; 256 samples at 8 kHz); a window is speech at probability ≥ 0.5.

- ``speech_fraction``: share of windows that are speech. A talking-head clip without
  speech (music, silence, a muted interview) is no training data for an audio-driven model.
- ``snr_db``: ``10·log10(mean speech-window power / noise power)``. The noise power is
  the lower of the median power of the non-speech windows (when there are at least 3) and
  the 5th percentile of all window powers (a minimum-statistics noise floor). The VAD's
  few non-speech windows in a short clip of continuous talking are mostly word edges, too
  loud to be the floor; the percentile then keeps the estimate honest. Power has a floor
  of 1e-10 (-100 dBFS), so digital silence reads as a very high SNR, not infinity.
  Without any speech window the SNR is reported as 0 dB.
Measured on the five real fixture clips: speech 59–93 %, SNR 27–42 dB (3 s excerpts ≥ 23
dB); espeak-ng speech with white noise of σ = 0.05 measures ≈ 6 dB.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.registry import ModelSpec
from tasks.base import FailureKind, ItemFailure

SPEECH_THRESHOLD = 0.5
POWER_FLOOR = 1e-10


def silero_weights_path() -> Path:
    """The TorchScript model inside the installed silero-vad package, found without importing
    the package (which imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'silero_vad'", name="silero_vad")
    return Path(spec.origin).resolve().parent / "data" / "silero_vad.jit"


def silero_model_spec() -> ModelSpec:
    return ModelSpec(family="silero-vad", source=str(silero_weights_path()))


@dataclass(frozen=True, slots=True)
class SpeechStats:
    speech_fraction: float
    snr_db: float
    speech_s: float


class SileroVad:
    """Silero VAD (TorchScript, shipped weights); one instance per worker, CPU, 1 thread."""

    def __init__(self) -> None:
        from silero_vad import load_silero_vad

        self.model = load_silero_vad()

    @staticmethod
    def window_samples(rate_hz: int) -> int:
        if rate_hz not in (8000, 16000):
            raise ItemFailure(
                FailureKind.FORMAT, f"Silero VAD needs 8 or 16 kHz audio, got {rate_hz} Hz"
            )
        return 512 if rate_hz == 16000 else 256

    def speech_probs(self, samples: np.ndarray, rate_hz: int) -> np.ndarray:
        """Speech probability per window (``ceil(len / window)`` values)."""
        self.window_samples(rate_hz)
        if samples.size == 0:
            return np.zeros(0, dtype=np.float32)
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                probs = self.model.audio_forward(torch.from_numpy(samples.copy()), rate_hz)
        finally:
            self.model.reset_states()
            torch.set_num_threads(previous)
        return probs.numpy().reshape(-1)

    def measure(self, samples: np.ndarray, rate_hz: int) -> SpeechStats:
        probs = self.speech_probs(samples, rate_hz)
        return speech_stats(probs, samples, self.window_samples(rate_hz), rate_hz)


def speech_stats(probs: np.ndarray, samples: np.ndarray, window: int, rate_hz: int) -> SpeechStats:
    """Speech share and SNR from per-window probabilities (see module docstring)."""
    n = len(probs)
    if n == 0:
        return SpeechStats(0.0, 0.0, 0.0)
    padded = np.zeros(n * window, dtype=np.float64)
    padded[: min(len(samples), n * window)] = samples[: n * window]
    power = np.maximum((padded.reshape(n, window) ** 2).mean(axis=1), POWER_FLOOR)
    speech = probs >= SPEECH_THRESHOLD
    if not speech.any():
        return SpeechStats(0.0, 0.0, 0.0)
    noise = float(np.percentile(power, 5))
    if np.count_nonzero(~speech) >= 3:
        noise = min(noise, float(np.median(power[~speech])))
    snr = 10.0 * np.log10(power[speech].mean() / noise)
    return SpeechStats(float(speech.mean()), float(snr), float(speech.sum() * window / rate_hz))
