"""PSNR and SSIM of uint8 RGB frames (the definitions the evaluate stage has always used).

- PSNR per frame ``10·log10(255² / MSE)`` in dB over all pixels and channels, data range
  255, capped at :data:`PSNR_CAP_DB` for identical frames (MSE 0 would be infinite, which
  JSON and averages cannot hold);
- SSIM per frame with ``skimage.metrics.structural_similarity(channel_axis=2,
  data_range=255)``: a 7×7 **uniform** window (skimage's default, not the 11×11 Gaussian of
  Wang et al.), per-channel SSIM averaged over channels.

Both are averaged over frames (the per-frame mean, as talking-head papers report) and only
mean something in self-reconstruction.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

PSNR_CAP_DB = 100.0
SSIM_WINDOW_PX = 7
DATA_RANGE = 255


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images (peak 255), capped at :data:`PSNR_CAP_DB`."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(DATA_RANGE**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two ``(H, W, 3)`` uint8 images (7×7 uniform window, data range 255)."""
    return float(
        structural_similarity(a, b, channel_axis=2, data_range=DATA_RANGE, win_size=SSIM_WINDOW_PX)
    )
