"""Measurements behind the quality rules, from the faces stage's artifacts.

- :func:`read_boxes`: the per-frame ``boxes.parquet`` as numpy columns.
- :func:`yaw_ratios`: a head-yaw proxy from the 5 landmarks: the nose's offset from the eye
  midpoint along the eye axis, in inter-ocular distances. 0 is frontal; for a head turned by
  θ it grows roughly as ``0.6 · tan θ`` (nose depth ≈ 0.6 inter-ocular distances), so 0.35
  is about 30°. Scale- and roll-invariant, cheap, and needs no 3D model; it is a proxy, not
  an angle.
- :func:`mouth_roi` / :func:`mouth_width_px`: where the mouth sits in the crops and how wide
  it is (median over detected frames of the mouth-corner landmarks mapped into crop pixels
  by each frame's source→crop affine).
- :func:`scan_crops`: one streaming pass over ``crops.mp4`` measuring blur on evenly spaced
  frames and lip motion on every frame pair.

**Lip motion** is how far the mouth region's texture moves between consecutive frames, in
percent of the mouth's width, after the global shift between the two crops is undone
(phase correlation), so residual head/crop motion mostly cancels. Per frame pair the mouth
region is resampled so the mouth is :data:`MOUTH_CANONICAL_PX` wide (whatever the source
face size, crop size or upscaling), and the speed along the image gradient is the
least-squares normal flow ``Σ|ΔI|·|∇I| / Σ|∇I|²`` (pixels per frame); dividing by the
mouth width makes it scale-free, and the ratio of a temporal to a spatial difference makes
it independent of contrast and of the blur an upscale adds. The clip's value is the
:data:`LIP_MOTION_PERCENTILE` th percentile over frame pairs, so pauses in speech do not
count against a talking clip. Calibration (crops at 256 px; the five real fixture clips
at their own size and downscaled to 0.5 and 0.3, faces 80–380 px): talking 2.5–5.3;
the first frame of each as a still photo swaying (±3 px, ±0.8°, ±1 % zoom) 0.4–1.0, or
frozen 0.01–0.7; the threshold, 1.6, sits at their geometric middle. The mean absolute
grey-level change used before read 1.7–8.0 talking against up to 1.6 for a swaying photo:
no threshold separated them. It catches frozen or still mouths (photo plus voice-over),
not "listening versus talking": that needs a learned A/V model (SyncNet).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from tasks.media import iter_frames

MOUTH_CANONICAL_PX = 16  # mouth width the region is resampled to before measuring motion
LIP_MOTION_PERCENTILE = 90.0
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


def _mouth_geometry(boxes: dict[str, np.ndarray]) -> tuple[float, float, float] | None:
    """Median mouth centre (x, y) and width in crop pixels over frames with landmarks."""
    lm = landmarks(boxes)
    ok = ~np.isnan(lm).any(axis=1)
    if not ok.any():
        return None
    m = np.stack([boxes[c][ok].astype(np.float64) for c in AFFINE_COLUMNS], axis=1)
    m = m.reshape(-1, 2, 3)
    corners = lm[ok, 6:10].reshape(-1, 2, 2)  # (frames, corner, xy) in source pixels
    mapped = np.einsum("nij,nkj->nki", m[:, :, :2], corners) + m[:, None, :, 2]
    mx = float(np.median(mapped[:, :, 0].mean(axis=1)))
    my = float(np.median(mapped[:, :, 1].mean(axis=1)))
    width = float(np.median(np.linalg.norm(mapped[:, 1] - mapped[:, 0], axis=1)))
    return mx, my, max(width, 4.0)


def mouth_roi(boxes: dict[str, np.ndarray], crop_px: int) -> Roi:
    """Mouth region in crop pixels from the mouth corners on detected frames.

    Width 1.5 × mouth width, from 0.5 above to 0.6 below the corners' midpoint (lips open
    downwards). Without landmarks, the lower-middle of the crop.
    """
    geometry = _mouth_geometry(boxes)
    if geometry is None:
        return _lower_middle(crop_px)
    mx, my, width = geometry

    def px(v: float) -> int:
        return int(np.clip(round(v), 0, crop_px))

    roi = Roi(
        px(mx - 0.75 * width), px(my - 0.5 * width), px(mx + 0.75 * width), px(my + 0.6 * width)
    )
    if roi.x1 - roi.x0 < 2 or roi.y1 - roi.y0 < 2:  # mouth outside the crop
        return _lower_middle(crop_px)
    return roi


def mouth_width_px(boxes: dict[str, np.ndarray], crop_px: int) -> float:
    """The mouth's width in crop pixels; without landmarks, that of :func:`mouth_roi`'s
    lower-middle fallback region (0.4 of the crop is 1.5 mouth widths)."""
    geometry = _mouth_geometry(boxes)
    return geometry[2] if geometry is not None else 0.4 * crop_px / 1.5


def _lower_middle(crop_px: int) -> Roi:
    return Roi(
        round(crop_px * 0.3), round(crop_px * 0.55), round(crop_px * 0.7), round(crop_px * 0.8)
    )


def _registered(prev: np.ndarray, cur: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``prev`` moved by the global shift between the two grayscale frames."""
    # phaseCorrelate windows its inputs in place: hand it copies
    (dx, dy), _ = cv2.phaseCorrelate(prev.copy(), cur.copy(), window)
    h, w = prev.shape
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(prev, shift, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _registered_change(
    prev: np.ndarray, cur: np.ndarray, window: np.ndarray, region: tuple[slice, slice]
) -> float:
    """Mean abs change in ``region`` after undoing the global shift between two frames."""
    return float(np.abs(cur[region] - _registered(prev, cur, window)[region]).mean())


def mouth_flow(before: np.ndarray, after: np.ndarray, mouth_px: float) -> float:
    """Normal-flow speed of a grayscale region between two registered frames, in percent of
    ``mouth_px`` (the mouth width in these pixels); see the module docstring."""
    k = MOUTH_CANONICAL_PX / mouth_px
    h, w = before.shape
    size = (max(4, round(w * k)), max(4, round(h * k)))
    a = cv2.resize(before, size, interpolation=cv2.INTER_AREA)
    b = cv2.resize(after, size, interpolation=cv2.INTER_AREA)
    mid = (a + b) / 2
    gx = cv2.Sobel(mid, cv2.CV_32F, 1, 0, ksize=3) / 8  # grey levels per pixel
    gy = cv2.Sobel(mid, cv2.CV_32F, 0, 1, ksize=3) / 8
    grad_sq = gx * gx + gy * gy
    speed = float((np.abs(b - a) * np.sqrt(grad_sq)).sum() / max(float(grad_sq.sum()), 1e-6))
    return 100.0 * speed / MOUTH_CANONICAL_PX


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
    lip_motion: float  # percentile of the mouth's motion, % of its width per frame
    frames: int


def scan_crops(
    crops: Path,
    crop_px: int,
    num_frames: int,
    blur_samples: int,
    blur_center_fraction: float,
    roi: Roi,
    mouth_px: float,
) -> CropScan:
    """Decode ``crops.mp4`` once as a stream and measure blur and lip motion (``roi``: the
    mouth region, ``mouth_px``: the mouth width, both in crop pixels)."""
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
                    moved = _registered(prev, gray, window)
                    motion.append(mouth_flow(moved[mouth], gray[mouth], mouth_px))
                prev = gray
                n += 1
    return CropScan(
        blur_laplacian_var=float(np.median(blur)) if blur else 0.0,
        lip_motion=float(np.percentile(motion, LIP_MOTION_PERCENTILE)) if motion else 0.0,
        frames=n,
    )
