"""Crop geometry as per-frame affine maps, and landmark-based similarity alignment.

Every crop is described by a 2×3 affine ``M`` mapping source pixels to crop pixels (at
``crop_size_px``); ``boxes.parquet`` stores it in columns ``m00 … m12`` for both modes:

- ``box`` mode: a square window around the smoothed box, ``M`` = scale + translation.
- ``landmarks`` mode: the similarity transform (rotation, uniform scale, translation; no
  shear) that best maps the 5 landmarks onto the ArcFace 5-point template (least squares,
  Umeyama's closed form), so eyes are level and the face sits at a fixed place and size
  whatever the head roll. The template is scaled so that its 112 px face square fills
  ``crop_size_px / (1 + margin)``. Landmarks are interpolated linearly between detection
  frames; the transform's crop centre (in source pixels), log scale and unwrapped angle are
  smoothed with the same centred moving average as boxes, so crops do not shake.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from tasks.faces_track import interpolate_rows, moving_average

# ArcFace/InsightFace 5-point template for a 112×112 face: eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)


def box_affines(
    crop_x: np.ndarray, crop_y: np.ndarray, crop_size: np.ndarray, crop_px: int
) -> np.ndarray:
    """``(N, 2, 3)`` maps of the square windows ``[x, x+size) × [y, y+size)`` to crop pixels."""
    k = crop_px / crop_size.astype(np.float64)
    m = np.zeros((len(k), 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = k
    m[:, 0, 2] = -k * crop_x
    m[:, 1, 2] = -k * crop_y
    return m


def interpolate_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Fill NaN rows of ``(N, 10)`` landmarks linearly from the rows that have them."""
    ok = ~np.isnan(landmarks).any(axis=1)
    if not ok.any():
        raise ValueError("no landmarks to align on")
    frames = np.arange(len(landmarks), dtype=np.float64)
    known = np.flatnonzero(ok).astype(np.float64)
    return interpolate_rows(frames, known, landmarks[ok])


def similarity(src: np.ndarray, dst: np.ndarray) -> complex:
    """Least-squares ``z`` with ``dst - mean(dst) ≈ z · (src - mean(src))`` in complex form."""
    zs = (src[:, 0] - src[:, 0].mean()) + 1j * (src[:, 1] - src[:, 1].mean())
    zd = (dst[:, 0] - dst[:, 0].mean()) + 1j * (dst[:, 1] - dst[:, 1].mean())
    return complex((np.conj(zs) * zd).sum() / max((np.abs(zs) ** 2).sum(), 1e-9))


def aligned_affines(
    landmarks: np.ndarray,
    crop_px: int,
    margin: float,
    smoothing: Literal["none", "moving_average"],
    window_frames: int,
) -> np.ndarray:
    """``(N, 2, 3)`` similarity maps from per-frame landmarks to the scaled template."""
    lm = interpolate_landmarks(landmarks).reshape(-1, 5, 2)
    template = (ARCFACE_TEMPLATE_112 - 56.0) * (crop_px / (1.0 + margin) / 112.0) + crop_px / 2
    centre = np.array([crop_px / 2, crop_px / 2])
    n = lm.shape[0]
    src_centre = np.zeros((n, 2))
    log_scale = np.zeros(n)
    angle = np.zeros(n)
    for i in range(n):
        z = similarity(lm[i], template)
        # the source point that lands on the crop centre: src = mean_s + (c - mean_d) / z
        w = complex(*(centre - template.mean(axis=0))) / z
        src_centre[i] = lm[i].mean(axis=0) + np.array([w.real, w.imag])
        log_scale[i] = np.log(abs(z))
        angle[i] = np.angle(z)
    angle = np.unwrap(angle)
    if smoothing == "moving_average" and window_frames > 1 and n > 1:
        src_centre = np.stack([moving_average(src_centre[:, j], window_frames) for j in (0, 1)], 1)
        log_scale = moving_average(log_scale, window_frames)
        angle = moving_average(angle, window_frames)
    z = np.exp(log_scale + 1j * angle)
    m = np.zeros((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1] = z.real, -z.imag
    m[:, 1, 0], m[:, 1, 1] = z.imag, z.real
    m[:, :, 2] = centre - np.einsum("nij,nj->ni", m[:, :, :2], src_centre)
    return m


def affine_square(m: np.ndarray, crop_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axis-aligned source square (x, y, size) centred where each crop is centred, with
    the crop's side in source pixels (exact in box mode; ignores rotation otherwise)."""
    scale = np.hypot(m[:, 0, 0], m[:, 1, 0])
    inv = np.linalg.inv(np.concatenate([m, np.tile([[[0.0, 0.0, 1.0]]], (len(m), 1, 1))], 1))
    centre = inv[:, :2, :2] @ np.array([crop_px / 2, crop_px / 2]) + inv[:, :2, 2]
    size = np.maximum(np.rint(crop_px / scale), 2).astype(np.int32)
    x = np.rint(centre[:, 0] - size / 2).astype(np.int32)
    y = np.rint(centre[:, 1] - size / 2).astype(np.int32)
    return x, y, size


def warp_crop(
    frame: np.ndarray, m: np.ndarray, crop_px: int, pad_mode: Literal["constant", "edge"]
) -> np.ndarray:
    """Apply a source→crop affine; large downscales go through an area resize first."""
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    if scale < 0.66:  # bilinear sampling alone would alias: pre-shrink with area averaging
        pre = min(1.0, scale * 1.5)
        h, w = frame.shape[:2]
        size = (max(1, round(w * pre)), max(1, round(h * pre)))
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        m = m.copy()
        m[:, :2] *= np.array([w / size[0], h / size[1]])
    border = cv2.BORDER_CONSTANT if pad_mode == "constant" else cv2.BORDER_REPLICATE
    return cv2.warpAffine(
        np.ascontiguousarray(frame),
        m,
        (crop_px, crop_px),
        flags=cv2.INTER_LINEAR,
        borderMode=border,
        borderValue=(0, 0, 0),
    )
