"""Shot-change (hard cut) detection on the decoded frames, adaptive like PySceneDetect.

Each frame gets a *content score*: the mean absolute difference of its HSV pixels from the
previous frame's, on a small thumbnail (0–255 scale, averaged over H, S and V; PySceneDetect's
``ContentDetector`` measure). A cut starts at frame ``i`` when its score is at least
``min_content`` and at least ``adaptive_ratio`` times the mean score of the ``window`` frames
on each side (``AdaptiveDetector``'s rule): steady fast motion raises the neighbours too and
is not a cut; a single jump is. Scores are computed while the clip streams through the
faces stage's detection pass; cuts are decided once all scores are known.

Hue is circular, but like PySceneDetect the plain difference is used: a cut changes far
more than hue, and the thresholds are calibrated on that measure.
"""

from __future__ import annotations

import cv2
import numpy as np

THUMB_WIDTH_PX = 96


class ContentScorer:
    """Streams frames and records each frame's content score (the first frame scores 0)."""

    def __init__(self, thumb_width_px: int = THUMB_WIDTH_PX):
        self.thumb_width_px = thumb_width_px
        self._prev: np.ndarray | None = None
        self.scores: list[float] = []

    def add(self, frames: np.ndarray) -> None:
        for frame in frames:
            h, w = frame.shape[:2]
            tw = min(self.thumb_width_px, w)
            th = max(1, round(h * tw / w))
            thumb = cv2.resize(frame, (tw, th), interpolation=cv2.INTER_AREA)
            hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV).astype(np.int16)
            if self._prev is None:
                self.scores.append(0.0)
            else:
                self.scores.append(float(np.abs(hsv - self._prev).mean()))
            self._prev = hsv


def detect_cuts(
    scores: np.ndarray | list[float],
    min_content: float = 15.0,
    adaptive_ratio: float = 3.0,
    window: int = 2,
) -> np.ndarray:
    """Frame indices where a new shot starts (never 0), by the adaptive rule above."""
    s = np.asarray(scores, dtype=np.float64)
    cuts: list[int] = []
    for i in range(1, len(s)):
        if s[i] < min_content:
            continue
        neighbours = np.concatenate([s[max(1, i - window) : i], s[i + 1 : i + 1 + window]])
        baseline = float(neighbours.mean()) if neighbours.size else 0.0
        if baseline == 0.0 or s[i] / baseline >= adaptive_ratio:
            cuts.append(i)
    return np.asarray(cuts, dtype=np.int64)
