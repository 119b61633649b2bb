"""Detection on the faces stage's keyframes: the configured full detection, or adaptive.

*Full* detection is the configured one: the frame downscaled to ``detect_max_side_px`` and
faces searched from ``detect_min_face_px`` up. Once the main face is tracked, the next
keyframes are *adaptive*: the frame is shrunk an integer ``m`` times (an exact area average,
OpenCV's fast path) so the main face measures about ``adaptive_face_px``, and faces are
searched from ``adaptive_min_face_ratio`` × the main face up (never smaller than the full
detection searches). A second face matters to the quality stage only from
``quality.max_second_face_ratio`` (0.5) × the main face, so 0.4 keeps every face it counts.
O-net refines one candidate per face there (``group_iou`` 0.3, :mod:`models.mtcnn_cascade`).
MTCNN's cost follows its pyramid and candidate windows: on the 590 px fixture clip an
adaptive keyframe costs ~9 ms of CPU against ~40 ms for a full one at 480 px (~80 ms with
facenet-pytorch's own cascade).

Detections are the detector's own (score, box, landmarks), mapped back to source pixels.
Adaptive detection needs a detector that searches a chosen size range (MTCNN); with
RetinaFace every keyframe gets the full detection. The stage falls back to full detection on
the first keyframe, after a shot change and after any miss (:mod:`tasks.faces_stream`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

from models.face_detection import Detection

if TYPE_CHECKING:
    from models.face_detector import FaceDetector

ADAPTIVE_GROUP_IOU = 0.3  # one O-net box per face (models.mtcnn_cascade); misses are retried


class KeyframeDetector:
    """Runs a detector on source-size keyframes; detections come back in source pixels."""

    def __init__(
        self,
        detector: FaceDetector,
        width: int,
        height: int,
        *,
        max_side_px: int,
        min_face_px: int,
        adaptive: bool,
        adaptive_face_px: int,
        adaptive_min_face_ratio: float,
    ):
        self.detector = detector
        long_side = max(width, height)
        full_scale = min(1.0, max_side_px / long_side)
        self.full_min_face_src = min_face_px / full_scale  # smallest face full detection finds
        # adaptive frames are never larger than full ones, and at least 2x smaller than source
        self.min_shrink = max(2, math.ceil(long_side / max_side_px))
        self.adaptive = adaptive and detector.tunable
        self.face_px = adaptive_face_px
        self.min_face_ratio = adaptive_min_face_ratio

    def full(self, frames: np.ndarray) -> list[list[Detection]]:
        """The configured detection on ``(n, H, W, 3)`` source frames."""
        return self.detector.detect(frames)

    def shrink_for(self, main_face_px: float) -> int | None:
        """The integer shrink for adaptive detection around a main face of ``main_face_px``
        source pixels, or None where it would not be smaller than the full detection."""
        if not self.adaptive:
            return None
        m = int(main_face_px // self.face_px)
        return m if m >= self.min_shrink else None

    def adaptive_detect(
        self, frames: np.ndarray, main_face_px: float, shrink: int
    ) -> list[list[Detection]]:
        """Detect on frames shrunk ``shrink`` times, from the smallest face that matters."""
        h, w = frames.shape[1:3]
        sh, sw = h // shrink, w // shrink
        small = np.stack(
            [
                cv2.resize(f[: sh * shrink, : sw * shrink], (sw, sh), interpolation=cv2.INTER_AREA)
                for f in frames
            ]
        )
        min_face_src = max(self.full_min_face_src, self.min_face_ratio * main_face_px)
        found = self.detector.detect(
            small, min_face_px=min_face_src / shrink, group_iou=ADAPTIVE_GROUP_IOU
        )
        return [[d.scaled(shrink) for d in dets] for dets in found]
