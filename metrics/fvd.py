"""FVD: Fréchet distance of I3D features of 16-frame windows (LatentSync's protocol).

Per video, LatentSync's ``eval_fvd`` takes frames ``[20, 36)`` of the face crops resized to
224×224 and embeds them with a Kinetics-400 I3D; FVD is the Fréchet distance between the
generated and the ground-truth sets of such window features. :func:`protocol_window` cuts
that window (``None`` for a clip shorter than 36 frames). :func:`windows_upto` gives the
consecutive non-overlapping 16-frame windows of the first ``n`` frames, for the long-sequence
curve (FVD at 32 / 128 / 256 / 512 frames over the clips at least that long).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from metrics.frechet import frechet_of_features

if TYPE_CHECKING:
    from models.i3d import I3D

INPUT_PX = 224  # I3D's input: 16-frame windows of 224 px frames
WINDOW_FRAMES = 16

PROTOCOL_START = 20
CURVE_LENGTHS = (32, 128, 256, 512)


def resize_frames(frames: np.ndarray, px: int = INPUT_PX) -> np.ndarray:
    if frames.shape[1:3] == (px, px):
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > px else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (px, px), interpolation=interp) for f in frames])


def protocol_window(frames: np.ndarray) -> np.ndarray | None:
    """Frames ``[20, 36)`` at 224 px, or ``None`` when the clip has fewer than 36 frames."""
    end = PROTOCOL_START + WINDOW_FRAMES
    if len(frames) < end:
        return None
    return resize_frames(frames[PROTOCOL_START:end])


def windows_upto(frames: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n // 16`` consecutive 16-frame windows of the first ``n`` frames (224 px)."""
    if len(frames) < n:
        return []
    return [
        resize_frames(frames[s : s + WINDOW_FRAMES])
        for s in range(0, n - WINDOW_FRAMES + 1, WINDOW_FRAMES)
    ]


def i3d_features(model: I3D, windows: list[np.ndarray]) -> np.ndarray:
    """Windows ``(16, 224, 224, 3)`` uint8 RGB → ``(W, 400)`` float32 features."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for w in windows:
            x = torch.from_numpy(np.ascontiguousarray(w)).to(device)
            x = x.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, T, H, W] in [-1, 1]
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 400), np.float32)


def fvd(generated_features: np.ndarray, truth_features: np.ndarray) -> float:
    return frechet_of_features(generated_features, truth_features)
