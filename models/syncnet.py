"""SyncNet ("Out of time", Chung & Zisserman 2016): network, MFCC input and sync scores.

An own implementation of the published "S" network, with the parameter names of the official
``syncnet_v2.model`` state dict (``netcnnaud.*``, ``netfcaud.*``, ``netcnnlip.*``,
``netfclip.*``), so the real checkpoint loads with ``load_state_dict(strict=True)``. The
weights are not in any wheel: import the official file to a local path. There is no
network access and no hub here.

Inputs, as the reference evaluation (``joonson/syncnet_python``, ``SyncNetInstance``)
builds them at 25 fps and 16 kHz:

- audio: ``[B, 1, 13, 20]`` MFCC windows: 13 coefficients × 20 steps at 100 Hz (0.2 s).
  :func:`mfcc` reproduces ``python_speech_features.mfcc`` with its defaults (25 ms
  rectangular window, 10 ms step, 512-point FFT, 26 mel filters 0-8 kHz, pre-emphasis
  0.97, lifter 22, c0 replaced by the log frame energy) on int16-scaled samples, as the
  reference reads the wav with scipy. Window ``v`` covers steps ``[4v, 4v + 20)``.
- lips: ``[B, 3, 5, 224, 224]``, a Conv3d input of 5 consecutive frames starting at video
  frame ``v``: the whole 224 px face crop (not its lower half; that is the Wav2Lip /
  LatentSync SyncNet), BGR, 0-255 floats, not normalised.

Both branches end in 1024-d embeddings compared by Euclidean distance. :func:`sync_scores`
turns per-window embeddings into the offset, Sync-D and Sync-C of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelUnavailableError, register_tiny_builder
from models.syncnet_spec import SAMPLE_RATE_HZ

WEIGHTS_FILE = "syncnet_v2.model"
EMBED_DIM = 1024
MFCC_RATE_HZ = 100
MFCC_PER_FRAME = 4  # 100 Hz MFCC steps per 25 fps video frame
MFCC_WINDOW = 20  # steps per audio window (0.2 s)
INT16_SCALE = 32768.0


def _block(
    conv: nn.Module, channels: int, norm: type[nn.Module], pool: nn.Module | None
) -> list[nn.Module]:
    layers = [conv, norm(channels), nn.ReLU(inplace=True)]
    return [*layers, pool] if pool is not None else layers


class SyncNet(nn.Module):
    """SyncNet "S": an audio and a lip branch into a shared 1024-d embedding space.

    The ``nn.Sequential`` indices match the official layer list (a conv, its batch norm,
    ReLU, and sometimes a max pool), so the state dict keys do too.
    """

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        bn2, bn3 = nn.BatchNorm2d, nn.BatchNorm3d
        self.netcnnaud = nn.Sequential(
            *_block(nn.Conv2d(1, 64, 3, padding=1), 64, bn2, nn.MaxPool2d(1, 1)),
            *_block(nn.Conv2d(64, 192, 3, padding=1), 192, bn2, nn.MaxPool2d(3, (1, 2))),
            *_block(nn.Conv2d(192, 384, 3, padding=1), 384, bn2, None),
            *_block(nn.Conv2d(384, 256, 3, padding=1), 256, bn2, None),
            *_block(nn.Conv2d(256, 256, 3, padding=1), 256, bn2, nn.MaxPool2d(3, 2)),
            *_block(nn.Conv2d(256, 512, (5, 4)), 512, bn2, None),
        )
        self.netcnnlip = nn.Sequential(
            *_block(
                nn.Conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2)),
                96,
                bn3,
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            ),
            *_block(
                nn.Conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
                256,
                bn3,
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            ),
            *_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, bn3, None),
            *_block(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, bn3, None),
            *_block(
                nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
                256,
                bn3,
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            ),
            *_block(nn.Conv3d(256, 512, (1, 6, 6)), 512, bn3, None),
        )
        self.netfcaud = self._head(embed_dim)
        self.netfclip = self._head(embed_dim)

    @staticmethod
    def _head(embed_dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim)
        )

    def forward_aud(self, mfcc_windows: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 13, 20]`` MFCC windows → ``[B, 1024]``."""
        return self.netfcaud(self.netcnnaud(mfcc_windows).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 5, 224, 224]`` BGR 0-255 frame stacks → ``[B, 1024]``."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def save_state_dict(model: SyncNet, path: Path) -> None:
    """Write the model as a plain state dict (the official file's format)."""
    torch.save(model.state_dict(), path)


def weights_file(path: Path) -> Path:
    """The weights file: ``path`` itself, or ``path/syncnet_v2.model`` for a directory."""
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_syncnet(path: Path, device: str | torch.device = "cpu") -> SyncNet:
    """Load a SyncNet state dict (``torch.load(weights_only=True)``) in eval mode.

    A missing file raises :class:`ModelUnavailableError`; a file that is not a plain state
    dict (e.g. a whole pickled module, which would need unpickling arbitrary code: refused)
    raises :class:`~models.checkpoints.CheckpointError`, and one whose keys or shapes do not
    match the architecture :class:`~models.checkpoints.CheckpointMismatchError` listing
    them (both are :class:`ModelUnavailableError`). A missing BatchNorm
    ``num_batches_tracked`` (files saved before PyTorch 0.4.1 lack it) is filled in.
    """
    file = weights_file(Path(path))
    if not file.is_file():
        raise ModelUnavailableError(
            f"SyncNet weights not found at {file}; import the official {WEIGHTS_FILE} there"
        )
    state = read_state_dict(
        file,
        hint="Re-save it as model.state_dict() with a trusted copy of the original code.",
    )
    model = SyncNet()
    load_into(
        model, state, file, what="the SyncNet architecture (netcnnaud/netfcaud/netcnnlip/netfclip)"
    )
    return model.to(device).eval()


@register_tiny_builder("syncnet")
def build_random_syncnet(directory: Path, seed: int) -> None:
    """A random-init, full-size SyncNet saved as ``syncnet_v2.model`` (tests, smoke runs).

    The architecture is fixed by the official checkpoint, so "tiny" is full size here
    (13.6 M parameters, 55 MB); the registry labels it ``random-init``.
    """
    torch.manual_seed(seed)
    save_state_dict(SyncNet(), directory / WEIGHTS_FILE)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_filterbank(num_filters: int, nfft: int, rate_hz: int) -> np.ndarray:
    """Triangular filters on FFT bins, ``floor((nfft + 1) · f / rate)`` as the reference."""
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate_hz / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / rate_hz).astype(int)
    bank = np.zeros((num_filters, nfft // 2 + 1))
    for j in range(num_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        bank[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        bank[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    return bank


def mfcc(samples: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """``[T, 13]`` MFCCs at 100 Hz of float samples in [-1, 1] (see module docstring).

    ``T = 1 + ceil((N - 400) / 160)`` for ``N > 400`` samples (the last frame zero-padded).
    """
    x = np.asarray(samples, dtype=np.float64) * INT16_SCALE
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1]) if len(x) else x
    win, step, nfft = round(0.025 * rate_hz), round(0.01 * rate_hz), 512
    count = 1 if len(x) <= win else 1 + int(np.ceil((len(x) - win) / step))
    padded = np.zeros((count - 1) * step + win)
    padded[: len(x)] = x
    frames = padded[np.arange(win)[None, :] + step * np.arange(count)[:, None]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    tiny = np.finfo(np.float64).eps
    energy = np.maximum(power.sum(axis=1), tiny)
    fbank = np.maximum(power @ _mel_filterbank(26, nfft, rate_hz).T, tiny)
    log_fb = np.log(fbank)
    # orthonormal DCT-II of the 26 log filter energies, first 13 coefficients
    n = log_fb.shape[1]
    k = np.arange(13)[:, None]
    basis = np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    ceps = log_fb @ basis.T
    ceps *= 1.0 + 11.0 * np.sin(np.pi * np.arange(13) / 22.0)  # lifter 22
    ceps[:, 0] = np.log(energy)
    return ceps


def mfcc_windows(ceps: np.ndarray, count: int) -> torch.Tensor:
    """``[count, 1, 13, 20]`` audio inputs for video frames ``0..count-1`` (steps ``4v…``)."""
    if count * MFCC_PER_FRAME - MFCC_PER_FRAME + MFCC_WINDOW > len(ceps):
        raise ValueError(f"{len(ceps)} MFCC steps are too few for {count} windows")
    idx = MFCC_PER_FRAME * np.arange(count)[:, None] + np.arange(MFCC_WINDOW)[None, :]
    windows = ceps[idx].transpose(0, 2, 1)[:, None]  # [count, 1, 13, 20]
    return torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))


@dataclass(frozen=True, slots=True)
class SyncScores:
    """Offset and confidence of per-window embeddings over lags ``-vshift..vshift``.

    ``offset_frames > 0``: the audio lags the video (audio window ``i + offset`` matches
    video window ``i``). syncnet_python prints the negated value as "AV offset".
    """

    offset_frames: int
    sync_d: float  # the lowest mean distance (at the offset)
    sync_c: float  # median over lags of the mean distance − the lowest
    mean_distance: np.ndarray  # per lag, lag = index − vshift


def sync_scores(lip: np.ndarray, audio: np.ndarray, vshift: int = 15) -> SyncScores:
    """Mean distance per lag between video and audio windows, as the reference computes it.

    For lag ``k`` and video window ``i`` the distance is ``‖lip[i] − audio[i + k]‖``, with
    audio windows outside the clip taken as zero vectors (the reference pads with zeros, so
    its published Sync-C/Sync-D thresholds, e.g. LatentSync's ``conf ≥ 3``, apply). The
    mean runs over all video windows.
    """
    lip = np.asarray(lip, dtype=np.float64)
    audio = np.asarray(audio, dtype=np.float64)
    if lip.shape != audio.shape or lip.ndim != 2 or not len(lip):
        raise ValueError(f"need equal [N, D] embeddings, got {lip.shape} and {audio.shape}")
    n = len(lip)
    padded = np.zeros((n + 2 * vshift, lip.shape[1]))
    padded[vshift : vshift + n] = audio
    mean = np.array(
        [
            np.linalg.norm(lip - padded[vshift + k : vshift + k + n], axis=1).mean()
            for k in range(-vshift, vshift + 1)
        ]
    )
    best = int(np.argmin(mean))
    return SyncScores(
        offset_frames=best - vshift,
        sync_d=float(mean[best]),
        sync_c=float(np.median(mean) - mean[best]),
        mean_distance=mean,
    )
