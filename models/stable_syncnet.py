"""LatentSync's pixel SyncNet (``StableSyncNet``) for a training-time lip-sync loss, and its mel.

MuseTalk 1.5's stage-2 sync loss uses LatentSync's ``latentsync_syncnet.pt`` with
``configs/syncnet/syncnet_16_pixel.yaml``: 16 frames of the **lower half** of 256 px faces,
RGB in ``[-1, 1]``, stacked on channels (``(B, 48, 128, 256)``), against a Wav2Lip mel window
``(B, 1, 80, 52)``; two convolutional encoders (``DownEncoder2D``: ``conv_in``, one
``ResnetBlock2D`` per level with a padded strided ``downsample_conv``, GroupNorm + ReLU out)
give 2048-d embeddings, L2-normalised. The loss is ``BCE(cos(v, a), 1)``. It is *not* the
SyncNet of the Sync-C/Sync-D metric (:mod:`models.syncnet`): evaluating with the network a
model was trained against would flatter it.

Own implementation with the official parameter names (``audio_encoder.*``,
``visual_encoder.*``), so the official checkpoint (``{"state_dict": ...}``, read with
``weights_only``) loads strictly. A folder holds ``latentsync_syncnet.pt`` and
``syncnet.yaml`` (the official config: its ``model`` section gives both encoders;
``data.num_frames`` / ``data.resolution`` the input). Only ``attn_blocks`` all 0 (the
``syncnet_16_pixel`` layout) is supported; ``stable_syncnet.pt`` needs the attention
variant and fails with a clear message. ``norm_num_groups`` (official 32) may be given in
the ``model`` section of tiny configs.

Mel (``latentsync/utils/audio.py``, Wav2Lip hyper-parameters): pre-emphasis 0.97 on the
whole signal, STFT ``n_fft = win = 800``, hop 200 (80 frames/s), Hann window, centred with
zero padding (librosa's default), magnitude, 80 Slaney mel bands 55-7600 Hz,
``20·log10(max(1e-5, ·)) - 20`` dB, mapped symmetrically to ``[-4, 4]`` and clipped. The
window of video frame ``f`` starts at mel column ``int(80 · f / fps)`` and is
``ceil(num_frames · 16 / 5)`` columns long (52 for 16 frames).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy.signal import lfilter
from torch import nn
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "syncnet-latentsync"
WEIGHTS_FILE = "latentsync_syncnet.pt"
CONFIG_FILE = "syncnet.yaml"
SAMPLE_RATE_HZ = 16_000
MEL_FPS = 80.0
_N_FFT, _HOP = 800, 200


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, down: int | tuple[int, int], groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.pad = (0, 1, 0, 1)
        if isinstance(down, tuple):
            self.pad = (0, 1, 1, 1) if down[0] == 1 else (1, 1, 0, 1) if down[1] == 1 else self.pad
        self.downsample_conv = nn.Conv2d(cout, cout, 3, stride=down) if down != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        if self.downsample_conv is not None:
            h = self.downsample_conv(F.pad(h, self.pad))
        return h


class DownEncoder2D(nn.Module):
    def __init__(self, conf: dict, groups: int) -> None:
        super().__init__()
        if any(conf.get("attn_blocks", [])):
            raise ModelUnavailableError(
                "StableSyncNet with attention blocks (syncnet_16_pixel_attn) is not supported; "
                "use latentsync_syncnet.pt with syncnet_16_pixel.yaml"
            )
        widths = list(conf["block_out_channels"])
        self.conv_in = nn.Conv2d(conf["in_channels"], widths[0], 3, padding=1)
        downs = [tuple(d) if isinstance(d, list) else d for d in conf["downsample_factors"]]
        prev = widths[0]
        blocks = []
        for width, down in zip(widths, downs, strict=True):
            blocks.append(_Resnet(prev, width, down, groups))
            prev = width
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return F.relu(self.norm_out(h))


class StableSyncNet(nn.Module):
    """``forward(frames (B, 3F, H/2, W) in [-1, 1], mel (B, 1, 80, M)) -> (v, a)`` unit vectors."""

    def __init__(self, model_conf: dict, num_frames: int = 16, resolution: int = 256) -> None:
        super().__init__()
        groups = int(model_conf.get("norm_num_groups", 32))
        self.audio_encoder = DownEncoder2D(model_conf["audio_encoder"], groups)
        self.visual_encoder = DownEncoder2D(model_conf["visual_encoder"], groups)
        self.num_frames, self.resolution = num_frames, resolution
        self.requires_grad_(False)

    @property
    def mel_columns(self) -> int:
        return math.ceil(self.num_frames * 16 / 5)

    def forward(self, frames: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual_encoder(frames).flatten(1)
        a = self.audio_encoder(mel).flatten(1)
        return F.normalize(v, dim=1), F.normalize(a, dim=1)


def sync_loss(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``BCE(cos(v, a), 1)`` per sample, the cosine clamped into ``(0, 1]`` as MuseTalk does."""
    d = F.cosine_similarity(v, a).clamp(1e-6, 1.0)
    return -torch.log(d)


def load_stable_syncnet(directory: str | Path, device: str | torch.device = "cpu") -> StableSyncNet:
    folder = Path(directory).expanduser()
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for f in (weights, config):
        if not f.is_file():
            raise ModelUnavailableError(
                f"LatentSync SyncNet: {f} not found; put {WEIGHTS_FILE} and the matching "
                f"syncnet_16_pixel.yaml (renamed {CONFIG_FILE}) in one folder and import it "
                f"with `talkforge models import {FAMILY} <folder>`"
            )
    conf = yaml.safe_load(config.read_text())
    data = conf.get("data") or {}
    model = StableSyncNet(
        conf["model"], int(data.get("num_frames", 16)), int(data.get("resolution", 256))
    )
    state = read_state_dict(weights, containers=("state_dict",))
    load_into(model, state, weights, what="LatentSync StableSyncNet (syncnet_16_pixel)")
    return model.to(device).eval()


def melspectrogram(wave: np.ndarray) -> np.ndarray:
    """``(80, ⌊N/200⌋ + 1)`` normalised mel of 16 kHz samples in ``[-1, 1]`` (see module doc)."""
    emphasised = lfilter([1.0, -0.97], [1.0], np.asarray(wave, dtype=np.float64))
    filters = mel_filter_bank(_N_FFT // 2 + 1, 80, 55.0, 7600.0, SAMPLE_RATE_HZ, "slaney", "slaney")
    mel = spectrogram(
        emphasised,
        window_function(_N_FFT, "hann"),
        frame_length=_N_FFT,
        hop_length=_HOP,
        power=1.0,
        center=True,
        pad_mode="constant",
        mel_filters=filters,
        mel_floor=0.0,
        dtype=np.float64,
    )
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - 20.0
    return np.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0).astype(np.float32)


def mel_window(mel: np.ndarray, start_frame: int, fps: float, columns: int) -> np.ndarray | None:
    """The ``(80, columns)`` window of a video frame, or None past the end of the audio."""
    start = int(MEL_FPS * start_frame / fps)
    if start + columns > mel.shape[1]:
        return None
    return mel[:, start : start + columns]


@register_tiny_builder(FAMILY)
def build_tiny_stable_syncnet(directory: Path, seed: int) -> None:
    """A random small StableSyncNet: 16 frames of 32×64 lower halves (64 px faces), 16-d."""
    conf = {
        "model": {
            "norm_num_groups": 4,
            "audio_encoder": {
                "in_channels": 1,
                "block_out_channels": [8, 8, 8, 16, 16, 16, 16],
                "downsample_factors": [[2, 1], 2, 2, 1, 2, 2, [2, 3]],
                "attn_blocks": [0] * 7,
                "dropout": 0.0,
            },
            "visual_encoder": {
                "in_channels": 48,
                "block_out_channels": [8, 8, 8, 16, 16, 16],
                "downsample_factors": [[1, 2], 2, 2, 2, 2, 2],
                "attn_blocks": [0] * 6,
                "dropout": 0.0,
            },
        },
        "data": {"num_frames": 16, "resolution": 64, "lower_half": True},
    }
    torch.manual_seed(seed)
    model = StableSyncNet(conf["model"], 16, 64)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(conf))))


def stable_syncnet_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
