"""Each per-frame extractor's official framing, from the faces stage's 5 landmarks.

LivePortrait and EMOCA were trained on crops framed from a *dense* landmark set
(LivePortrait: its own 203/106 points; EMOCA: FAN's 68), cut from the full frame; the
faces stage's generic crop (1.5 × the detector box) is neither. So the features stage
decodes the clip itself and cuts each extractor's crop with its official rule
(:func:`models.liveportrait.crop_affine`, :func:`models.emoca.crop_affine`) applied to
the dense-landmark box estimated from the 5 points every detection stores (eye centres,
nose tip, mouth corners):

**Dense-landmark box from 5 points** (:func:`landmark_box`). Axes as LivePortrait's: ``uy``
from the eye centre ``e`` to the mouth centre, ``ux`` perpendicular to it; unit
``s = sqrt(eye-to-mouth distance × inter-ocular distance)``; ``n`` = the nose tip's
offset from ``e`` along ``ux``, in ``s`` (a yaw proxy: as the head turns the jaw contour's
centre moves against the nose). Then

- centre = ``e + s · (`` :data:`CENTRE_ACROSS_PER_NOSE` ``· n · ux +`` :data:`CENTRE_DOWN`
  ``· uy)``;
- extent along ``ux`` :data:`WIDTH` ``· s``, along ``uy`` :data:`HEIGHT` ``· s``; the
  square LivePortrait makes of it (``max(w, h)``, which varies from face to face more than
  either side) :data:`SQUARE` ``· s``;
- EMOCA's axis-aligned box: the outline is nearly round (``w ≈ h``), so its extents under
  a roll ``θ`` are those of an ellipse with those axes, ``sqrt((w cos θ)² + (h sin θ)²)``
  across and ``sqrt((w sin θ)² + (h cos θ)²)`` down.

The constants were fitted with dlib's 68-point shape predictor against MTCNN's 5 points on
258 faces (every 6th frame of the five real fixture clips and skimage's astronaut, each
also mirrored); spread around them: centre 0.05 s across, 0.04 s down; sides 4–5 %.
Crops cut from the estimate against crops cut from the 68 points themselves: LivePortrait's
centre is off by 1.1 % of the crop side (median; 95th percentile 2.3 %), its side by ±7 %
(95th pct.); EMOCA's centre by 2.2 % (5.0 %), its side by −0.6 % on average (5.6 %); with
the faces rolled by 20° EMOCA's reach 4.0 % (7.1 %) and −3.6 % (8.2 %).

Landmarks exist on detection frames only: the others are interpolated linearly; then the
box (centre, log sides, angle) is smoothed over ``window_frames`` with the faces stage's
centred moving average, so the crops do not shake. Crops are cut from the full frame with
black outside it, as both references do (:func:`tasks.faces_align.warp_crop`, which also
area-shrinks large downscales first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models import emoca, liveportrait
from tasks.faces_align import interpolate_landmarks, warp_crop
from tasks.faces_track import moving_average

CENTRE_ACROSS_PER_NOSE = -1.589
CENTRE_DOWN = 0.676
WIDTH = 2.104
HEIGHT = 2.150
SQUARE = 2.190
FRAMED_SIZES_PX = {"liveportrait_motion": liveportrait.INPUT_SIZE, "emoca_flame": emoca.INPUT_SIZE}


@dataclass(frozen=True)
class LandmarkBox:
    """Per-frame dense-landmark boxes in source pixels, in the face's own axes."""

    centre: np.ndarray  # (N, 2)
    ux: np.ndarray  # (N, 2) unit vector across the face (image x when upright)
    uy: np.ndarray  # (N, 2) unit vector from the eyes to the mouth
    scale: np.ndarray  # (N,) s = sqrt(eye-to-mouth × inter-ocular distance)

    def liveportrait_affines(self) -> np.ndarray:
        side = SQUARE * self.scale
        return liveportrait.crop_affine(self.centre, self.ux, self.uy, side, side)

    def emoca_affines(self) -> np.ndarray:
        cos, sin = np.abs(self.ux[:, 0]), np.abs(self.ux[:, 1])
        w, h = WIDTH * self.scale, HEIGHT * self.scale
        half_w = np.hypot(w * cos, h * sin) / 2
        half_h = np.hypot(w * sin, h * cos) / 2
        (cx, cy) = self.centre.T
        return emoca.crop_affine(cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def landmark_box(landmarks: np.ndarray, window_frames: int = 1) -> LandmarkBox:
    """Dense-landmark boxes from ``(N, 10)`` 5-point landmarks (NaN rows: not detected,
    interpolated), smoothed over ``window_frames`` (odd; 1: per frame). ``ValueError``
    when no frame has landmarks."""
    lm = interpolate_landmarks(landmarks).reshape(-1, 5, 2)
    eyes = (lm[:, 0] + lm[:, 1]) / 2
    mouth = (lm[:, 3] + lm[:, 4]) / 2
    down = mouth - eyes
    eye_to_mouth = np.maximum(np.linalg.norm(down, axis=1), 1e-6)
    inter_ocular = np.maximum(np.linalg.norm(lm[:, 1] - lm[:, 0], axis=1), 1e-6)
    uy = down / eye_to_mouth[:, None]
    ux = np.stack([uy[:, 1], -uy[:, 0]], axis=1)
    scale = np.sqrt(eye_to_mouth * inter_ocular)
    nose = np.einsum("nj,nj->n", lm[:, 2] - eyes, ux) / scale
    centre = eyes + scale[:, None] * (
        CENTRE_ACROSS_PER_NOSE * nose[:, None] * ux + CENTRE_DOWN * uy
    )
    if window_frames > 1 and len(lm) > 1:
        angle = moving_average(np.unwrap(np.arctan2(ux[:, 1], ux[:, 0])), window_frames)
        ux = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        uy = np.stack([-ux[:, 1], ux[:, 0]], axis=1)
        centre = np.stack([moving_average(centre[:, j], window_frames) for j in (0, 1)], 1)
        scale = np.exp(moving_average(np.log(scale), window_frames))
    return LandmarkBox(centre, ux, uy, scale)


def framing_affines(
    landmarks: np.ndarray, families: list[str], window_frames: int
) -> dict[str, np.ndarray]:
    """``{family: (N, 2, 3) source→crop affines}`` for the framed extractors among
    ``families`` (``liveportrait_motion``, ``emoca_flame``)."""
    wanted = [f for f in families if f in FRAMED_SIZES_PX]
    if not wanted:
        return {}
    box = landmark_box(landmarks, window_frames)
    rules = {"liveportrait_motion": box.liveportrait_affines, "emoca_flame": box.emoca_affines}
    return {family: rules[family]() for family in wanted}


def cut_crops(frames: np.ndarray, affines: np.ndarray, size_px: int) -> np.ndarray:
    """``(n, H, W, 3)`` full frames → ``(n, size, size, 3)`` crops, one affine per frame."""
    return np.stack(
        [warp_crop(frame, m, size_px, "constant") for frame, m in zip(frames, affines, strict=True)]
    )
