"""Shot-change (hard cut) detection on the decoded frames, adaptive like PySceneDetect.

Each frame gets a *content score*: the mean absolute difference of its HSV pixels from the
previous frame's, on a small thumbnail (0–255 scale, averaged over H, S and V; PySceneDetect's
``ContentDetector`` measure). The thumbnail takes every ``s``-th pixel of each row and column
(``s = width // 96``): a strided view costs nothing to make, where an area resize of every
frame cost more than the rest of the scoring. Sampling instead of averaging lets a little
more noise and motion through (continuous shots of the fixture clips score at most ~7, about
20 % above the area thumbnail's values and 0.98 correlated with them), far below a cut's
30–100 and the ``min_content`` default of 15, so the thresholds are unchanged.

A cut starts at frame ``i`` when its score is at least ``min_content`` and at least
``adaptive_ratio`` times the mean score of the ``window`` frames on each side
(``AdaptiveDetector``'s rule): steady fast motion raises the neighbours too and is not a cut;
a single jump is. :class:`CutFinder` decides each frame as soon as its ``window`` later
scores are known, so the faces stage can restart its track while the clip streams.

Hue is circular, but like PySceneDetect the plain difference is used: a cut changes far
more than hue, and the thresholds are calibrated on that measure.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        """Score a ``(n, H, W, 3)`` uint8 RGB chunk (one HSV conversion for the chunk)."""
        n, w = frames.shape[0], frames.shape[2]
        if n == 0:
            return
        s = max(1, w // self.thumb_width_px)
        thumbs = np.ascontiguousarray(frames[:, ::s, ::s])
        th, tw = thumbs.shape[1:3]
        hsv = cv2.cvtColor(thumbs.reshape(n * th, tw, 3), cv2.COLOR_RGB2HSV).reshape(n, th, tw, 3)
        prev = hsv[0] if self._prev is None else self._prev
        diffs = np.empty_like(hsv)
        cv2.absdiff(hsv[0], prev, dst=diffs[0])
        if n > 1:  # |a - b| of uint8 images, exact
            cv2.absdiff(hsv[1:], hsv[:-1], dst=diffs[1:])
        self.scores.extend(diffs.reshape(n, -1).mean(axis=1).tolist())
        self._prev = hsv[-1]


def is_cut(
    scores: Sequence[float], i: int, min_content: float, adaptive_ratio: float, window: int
) -> bool:
    """Whether a new shot starts at frame ``i`` (>= 1) by the adaptive rule above."""
    if scores[i] < min_content:
        return False
    neighbours = [*scores[max(1, i - window) : i], *scores[i + 1 : i + 1 + window]]
    baseline = sum(neighbours) / len(neighbours) if neighbours else 0.0
    return baseline == 0.0 or scores[i] / baseline >= adaptive_ratio


def detect_cuts(
    scores: np.ndarray | list[float],
    min_content: float = 15.0,
    adaptive_ratio: float = 3.0,
    window: int = 2,
) -> np.ndarray:
    """Frame indices where a new shot starts (never 0), by the adaptive rule above."""
    s = [float(v) for v in scores]
    cuts = [i for i in range(1, len(s)) if is_cut(s, i, min_content, adaptive_ratio, window)]
    return np.asarray(cuts, dtype=np.int64)


class CutFinder:
    """Decides cuts while scores stream in; the same cuts as :func:`detect_cuts` at the end."""

    def __init__(self, min_content: float = 15.0, adaptive_ratio: float = 3.0, window: int = 2):
        self.min_content = min_content
        self.adaptive_ratio = adaptive_ratio
        self.window = window
        self.cuts: list[int] = []
        self.decided = 1  # frames before this one are decided (frame 0 never is a cut)

    def update(self, scores: list[float], final: bool = False) -> int:
        """Decide every frame whose ``window`` later scores are known (all when ``final``);
        returns the first undecided frame."""
        end = len(scores) if final else len(scores) - self.window
        for i in range(self.decided, end):
            if is_cut(scores, i, self.min_content, self.adaptive_ratio, self.window):
                self.cuts.append(i)
        self.decided = max(self.decided, end)
        return self.decided
