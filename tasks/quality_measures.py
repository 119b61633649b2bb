"""Measurements behind the quality rules, from the faces stage's artifacts.

- :func:`read_boxes`: the per-frame ``boxes.parquet`` as numpy columns.
- :func:`yaw_ratios`: a head-yaw proxy from the 5 landmarks: the nose's offset from the eye
  midpoint along the eye axis, in inter-ocular distances. 0 is frontal; for a head turned by
  θ it grows roughly as ``0.6 · tan θ`` (nose depth ≈ 0.6 inter-ocular distances), so 0.35
  is about 30°. Scale- and roll-invariant, cheap, and needs no 3D model; it is a proxy, not
  an angle.
- :func:`mouth_roi`: where the mouth sits in the crops (median over detected frames of the
  mouth-corner landmarks mapped into crop pixels by each frame's source→crop affine).
- :func:`scan_crops`: one streaming pass over ``crops.mp4`` measuring blur on evenly spaced
  frames and lip motion on every frame: the mean absolute change of the grayscale mouth
  region (0–255 levels) from the previous frame after undoing the global shift between the
  two crops (phase correlation), so residual head/crop motion mostly cancels. Measured:
  real talking clips 1.9–7.8 (256 px crops), a still photo swaying a few pixels 1.4, a
  frozen frame ≈ codec noise (< 0.5). It catches frozen or still mouths (photo plus
  voice-over), not "listening versus talking": that needs a learned A/V model (SyncNet).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from tasks.media import iter_frames

LANDMARK_COLUMNS = [f"lm_{axis}{i}" for i in range(5) for axis in ("x", "y")]
AFFINE_COLUMNS = ["m00", "m01", "m02", "m10", "m11", "m12"]  # source → crop pixels


def read_boxes(path: Path) -> dict[str, np.ndarray]:
    """Columns of ``boxes.parquet`` as arrays (floats keep NaN, strings become objects)."""
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def landmarks(boxes: dict[str, np.ndarray]) -> np.ndarray:
    """``(N, 10)`` landmark array (x0, y0, …, x4, y4), NaN where not detected."""
    return np.stack([boxes[c].astype(np.float64) for c in LANDMARK_COLUMNS], axis=1)


def yaw_ratios(lm: np.ndarray) -> np.ndarray:
    """Signed yaw proxy per row of ``(M, 10)`` landmarks (see module docstring)."""
    left_eye, right_eye, nose = lm[:, 0:2], lm[:, 2:4], lm[:, 4:6]
    axis = right_eye - left_eye
    iod_sq = np.maximum((axis**2).sum(axis=1), 1e-9)
    return ((nose - (left_eye + right_eye) / 2) * axis).sum(axis=1) / iod_sq


@dataclass(frozen=True, slots=True)
class Roi:
    """A rectangle in crop pixels, ``[x0, x1) × [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int


def mouth_roi(boxes: dict[str, np.ndarray], crop_px: int) -> Roi:
    """Mouth region in crop pixels from the mouth corners on detected frames.

    Width 1.5 × mouth width, from 0.5 above to 0.6 below the corners' midpoint (lips open
    downwards). Without landmarks, the lower-middle of the crop.
    """
    lm = landmarks(boxes)
    ok = ~np.isnan(lm).any(axis=1)
    if not ok.any():
        return _lower_middle(crop_px)
    m = np.stack([boxes[c][ok].astype(np.float64) for c in AFFINE_COLUMNS], axis=1)
    m = m.reshape(-1, 2, 3)
    corners = lm[ok, 6:10].reshape(-1, 2, 2)  # (frames, corner, xy) in source pixels
    mapped = np.einsum("nij,nkj->nki", m[:, :, :2], corners) + m[:, None, :, 2]
    mx = float(np.median(mapped[:, :, 0].mean(axis=1)))
    my = float(np.median(mapped[:, :, 1].mean(axis=1)))
    width = float(np.median(np.linalg.norm(mapped[:, 1] - mapped[:, 0], axis=1)))
    width = max(width, 4.0)

    def px(v: float) -> int:
        return int(np.clip(round(v), 0, crop_px))

    roi = Roi(
        px(mx - 0.75 * width), px(my - 0.5 * width), px(mx + 0.75 * width), px(my + 0.6 * width)
    )
    if roi.x1 - roi.x0 < 2 or roi.y1 - roi.y0 < 2:  # mouth outside the crop
        return _lower_middle(crop_px)
    return roi


def _lower_middle(crop_px: int) -> Roi:
    return Roi(
        round(crop_px * 0.3), round(crop_px * 0.55), round(crop_px * 0.7), round(crop_px * 0.8)
    )


def _registered_change(
    prev: np.ndarray, cur: np.ndarray, window: np.ndarray, region: tuple[slice, slice]
) -> float:
    """Mean abs change in ``region`` after undoing the global shift between two frames."""
    # phaseCorrelate windows its inputs in place: hand it copies
    (dx, dy), _ = cv2.phaseCorrelate(prev.copy(), cur.copy(), window)
    h, w = prev.shape
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(prev, shift, (w, h), borderMode=cv2.BORDER_REPLICATE)
    return float(np.abs(cur[region] - moved[region]).mean())


def laplacian_variance(rgb: np.ndarray, center_fraction: float = 1.0) -> float:
    """Variance of the Laplacian of the grayscale central square of an RGB uint8 image."""
    h, w = rgb.shape[:2]
    side_h, side_w = max(1, round(h * center_fraction)), max(1, round(w * center_fraction))
    y0, x0 = (h - side_h) // 2, (w - side_w) // 2
    gray = cv2.cvtColor(
        np.ascontiguousarray(rgb[y0 : y0 + side_h, x0 : x0 + side_w]), cv2.COLOR_RGB2GRAY
    )
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


@dataclass(frozen=True, slots=True)
class CropScan:
    blur_laplacian_var: float  # median over the sampled frames
    lip_motion: float  # mean abs change of the mouth region between consecutive frames
    frames: int


def scan_crops(
    crops: Path,
    crop_px: int,
    num_frames: int,
    blur_samples: int,
    blur_center_fraction: float,
    roi: Roi,
) -> CropScan:
    """Decode ``crops.mp4`` once as a stream and measure blur and lip motion."""
    wanted = set(
        np.unique(np.linspace(0, max(num_frames - 1, 0), blur_samples).round().astype(int))
    )
    blur: list[float] = []
    motion: list[float] = []
    prev: np.ndarray | None = None
    window = cv2.createHanningWindow((crop_px, crop_px), cv2.CV_32F)
    mouth = (slice(roi.y0, roi.y1), slice(roi.x0, roi.x1))
    n = 0
    with closing(iter_frames(crops, crop_px, crop_px)) as frames:
        for chunk in frames:
            for frame in chunk:
                if n in wanted:
                    blur.append(laplacian_variance(frame, blur_center_fraction))
                gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
                if prev is not None:
                    motion.append(_registered_change(prev, gray, window, mouth))
                prev = gray
                n += 1
    return CropScan(
        blur_laplacian_var=float(np.median(blur)) if blur else 0.0,
        lip_motion=float(np.mean(motion)) if motion else 0.0,
        frames=n,
    )
