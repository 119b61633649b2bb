"""The faces stage in one decoding pass: detect, track, crop and encode as frames stream.

:meth:`FaceStream.feed` takes decoded chunks in order. Every frame is scored for shot
changes (:mod:`tasks.faces_shots`); keyframes (every ``detect_every_k``-th frame, and the
last one at :meth:`FaceStream.finish`) are detected (:mod:`tasks.faces_keyframes`) in
batches of ``resources.batch_size`` once the two frames after each are scored, so a cut just
before a keyframe is known when the tracker takes its detections
(:class:`tasks.faces_track.MainFaceTracker`, reset after each cut). Frames wait in a
look-ahead buffer until their crop is *final*:

- a frame's box is interpolated between the successful detections around it, so it is final
  once the next successful detection after it is known (``build_track``'s rule; before the
  first one the first box holds, after the last one the last box holds);
- the centred moving average (``smoothing_window_frames``) needs ``half`` more final boxes,
  so frames up to ``last successful detection - half`` are final; ``align: landmarks``
  interpolates and smooths landmarks over the same spans.

Final frames are cropped with the same pure functions the whole-clip computation uses
(``smooth_track``/``crop_windows``/``box_affines`` or ``aligned_affines``/``affine_square``),
applied to a window of per-frame metadata that covers every input those frames depend on,
and sent to the encoder. The buffer therefore holds at most one detection batch
(``batch_size × detect_every_k`` frames), a chunk, ``max_gap_frames`` and ``half`` frames and
a few more, whatever the clip length. A miss that leaves the face unseen for more than
``max_gap_frames`` dooms the clip: the buffer is dropped and only detection goes on, so that
``build_track`` at the end raises the same ``NO_FACE``/``FACE_LOST`` as on the whole clip.
Crops go to scratch only; a failed clip commits nothing.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tasks.base import FailureKind, ItemFailure
from tasks.faces_align import affine_square, aligned_affines, box_affines, warp_crop
from tasks.faces_config import FacesConfig
from tasks.faces_keyframes import KeyframeDetector
from tasks.faces_shots import ContentScorer, CutFinder
from tasks.faces_track import (
    KeyframeObs,
    MainFaceTracker,
    Track,
    build_track,
    crop_square,
    crop_windows,
    interpolate_rows,
    smooth_track,
)
from tasks.media import VideoWriter


@dataclass
class StreamResult:
    """Everything ``boxes.parquet`` and the FaceTrack record need, one row per frame."""

    track: Track
    affines: np.ndarray  # (N, 2, 3) source → crop pixels
    crop_x: np.ndarray
    crop_y: np.ndarray
    crop_size: np.ndarray
    content_score: np.ndarray
    shot_change: np.ndarray  # bool


class FaceStream:
    """Single-pass faces stage state for one clip (see module docstring)."""

    def __init__(
        self,
        cfg: FacesConfig,
        keyframes: KeyframeDetector,
        open_writer: Callable[[], VideoWriter] | None,
    ):
        self.cfg = cfg
        self.keyframes = keyframes
        # the encoder starts with the first crops, off the decoder's start-up path;
        # None: geometry only, no crops (tests)
        self.open_writer = open_writer
        self.writer: VideoWriter | None = None
        self.half = cfg.smoothing_window_frames // 2 if cfg.smoothing == "moving_average" else 0
        self.tracker = MainFaceTracker(
            cfg.min_detection_score, cfg.min_track_iou, cfg.max_gap_frames
        )
        self.scorer = ContentScorer()
        self.cuts = CutFinder(cfg.shot_min_content, cfg.shot_adaptive_ratio)
        self.buffer: deque[np.ndarray] = deque()  # frames [emitted, decoded) awaiting crops
        self.pending: dict[int, np.ndarray] = {}  # keyframes awaiting detection
        self.last_frame: np.ndarray | None = None
        self.decoded = 0
        self.emitted = 0
        self.next_key = 0  # the next multiple of k to detect
        self.observations: list[KeyframeObs] = []
        self.found_frames: list[int] = []
        self.found_boxes: list[np.ndarray] = []
        self.found_landmarks: list[np.ndarray] = []
        self.doomed = False
        self.geometry: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    # -- input ---------------------------------------------------------------------------

    def feed(self, chunk: np.ndarray) -> None:
        """Take the next ``(n, H, W, 3)`` decoded frames; crops what became final."""
        n = chunk.shape[0]
        if n == 0:
            return
        k = self.cfg.detect_every_k
        self.scorer.add(chunk)
        self.cuts.update(self.scorer.scores)
        for f in range(-(-self.decoded // k) * k, self.decoded + n, k):
            self.pending[f] = chunk[f - self.decoded]
        if not self.doomed:
            self.buffer.extend(chunk)
        self.last_frame = chunk[-1]
        self.decoded += n
        self._detect_ready(self.decoded - self.cuts.window)
        self._emit(final=False)

    def finish(self) -> StreamResult:
        """End of stream: detect the rest (and the last frame), crop the rest, return rows.

        Raises ``NO_FACE``/``FACE_LOST`` exactly as ``build_track`` does on the whole clip.
        """
        n = self.decoded
        self.cuts.update(self.scorer.scores, final=True)
        self._detect_ready(n, final=True)
        track = build_track(n, self.observations, self.cfg.max_gap_frames)
        self._emit(final=True)
        parts = zip(*self.geometry, strict=True)
        affines, xs, ys, sizes = (np.concatenate(p) for p in parts)
        shot_change = np.zeros(n, dtype=bool)
        shot_change[self.cuts.cuts] = True
        scores = np.asarray(self.scorer.scores, dtype=np.float64)
        return StreamResult(track, affines, xs, ys, sizes, scores, shot_change)

    # -- detection and tracking -----------------------------------------------------------

    def _detect_ready(self, limit: int, final: bool = False) -> None:
        """Detect the pending keyframes before ``limit`` once a batch of them is ready (all of
        them, and the last frame, when ``final``)."""
        k = self.cfg.detect_every_k
        keys = list(range(self.next_key, max(limit, self.next_key), k))
        if not final and len(keys) < self.cfg.resources.batch_size:
            return
        frames = [self.pending.pop(f) for f in keys]
        if keys:
            self.next_key = keys[-1] + k
        n = self.decoded
        if final and n and (n - 1) % k:
            assert self.last_frame is not None
            keys.append(n - 1)
            frames.append(self.last_frame)
        i = 0
        while i < len(keys):
            i += self._detect_run(keys[i:], frames[i:])

    def _cut_between(self, after: int, upto: int) -> bool:
        """Whether a shot starts in frames ``(after, upto]``."""
        i = bisect.bisect_right(self.cuts.cuts, after)
        return i < len(self.cuts.cuts) and self.cuts.cuts[i] <= upto

    def _detect_run(self, keys: list[int], frames: list[np.ndarray]) -> int:
        """Detect the leading keyframes that share a mode and feed the tracker; returns how
        many. Adaptive while the face is tracked (up to the next cut); otherwise one full
        detection at a time while adaptive detection may resume after it, or all full."""
        last = self.observations[-1] if self.observations else None
        main = last.main if last is not None else None  # None after a miss
        shrink = self.keyframes.shrink_for(main.size_px) if main is not None else None
        run = 1
        if last is not None and shrink is not None:
            while run < len(keys) and not self._cut_between(last.frame, keys[run]):
                run += 1
            adaptive = not self._cut_between(last.frame, keys[0])
            if not adaptive:
                run = 1
        else:
            adaptive = False
            if main is not None or not self.keyframes.adaptive:
                run = len(keys)  # the tracked face is too small to shrink, or no adaptive
        batch = np.stack(frames[:run])
        if adaptive:
            assert main is not None and shrink is not None
            found = self.keyframes.adaptive_detect(batch, main.size_px, shrink)
        else:
            found = self.keyframes.full(batch)
        prev = last.frame if last is not None else -1
        for f, frame, dets in zip(keys[:run], frames[:run], found, strict=True):
            if self._cut_between(prev, f):
                self.tracker.reset()
            obs = self.tracker.update(f, dets)
            if adaptive and obs.main is None:  # an adaptive miss is confirmed by a full one
                obs = self.tracker.update(f, self.keyframes.full(frame[None])[0])
            self._commit(obs)
            prev = f
        return run

    def _commit(self, obs: KeyframeObs) -> None:
        self.observations.append(obs)
        if obs.main is not None:
            self.found_frames.append(obs.frame)
            self.found_boxes.append(obs.main.box())
            lm = obs.main.landmarks
            self.found_landmarks.append(
                np.asarray(lm, dtype=np.float64).reshape(10) if lm else np.full(10, np.nan)
            )
        last_found = self.found_frames[-1] if self.found_frames else -1
        if obs.frame - last_found > self.cfg.max_gap_frames and not self.doomed:
            self.doomed = True  # build_track will fail the clip: stop buffering frames
            self.buffer.clear()

    # -- geometry and crops ---------------------------------------------------------------

    def _emit(self, final: bool) -> None:
        """Crop and encode every buffered frame whose geometry is final."""
        if self.doomed:
            return
        if final:
            frontier = self.decoded
        elif self.found_frames:
            frontier = self.found_frames[-1] - self.half + 1
        else:
            return
        if frontier <= self.emitted:
            return
        lo, hi = self.emitted, frontier
        affines, xs, ys, sizes = self._geometry(lo, hi, final)
        self.geometry.append((affines, xs, ys, sizes))
        frames = [self.buffer.popleft() for _ in range(hi - lo)]
        self.emitted = hi
        if self.open_writer is None:
            return
        if self.writer is None:
            self.writer = self.open_writer()
        px, pad = self.cfg.crop_size_px, self.cfg.pad_mode
        crops = np.empty((hi - lo, px, px, 3), dtype=np.uint8)
        for j, frame in enumerate(frames):
            if self.cfg.align == "landmarks":
                crops[j] = warp_crop(frame, affines[j], px, pad)
            else:
                crops[j] = crop_square(frame, int(xs[j]), int(ys[j]), int(sizes[j]), px, pad)
        self.writer.write(crops)

    def _found_span(self, start: int, stop: int) -> slice:
        """Successful detections from the last one at or before ``start`` to the first one at
        or after ``stop - 1``: all that interpolation over ``[start, stop)`` uses."""
        i = max(0, bisect.bisect_right(self.found_frames, start) - 1)
        j = bisect.bisect_left(self.found_frames, stop - 1) + 1
        return slice(i, j)

    def _geometry(
        self, lo: int, hi: int, final: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Affines and source squares of frames ``[lo, hi)``, from a window of frames that
        holds every input the smoothing of those frames reads."""
        cfg = self.cfg
        px = cfg.crop_size_px
        start = max(0, lo - self.half)
        stop = min(self.decoded, hi + self.half) if final else hi + self.half
        span = self._found_span(start, stop)
        found = np.asarray(self.found_frames[span], dtype=np.float64)
        if cfg.align == "landmarks":
            start, stop = min(start, int(found[0])), max(stop, int(found[-1]) + 1)
            landmarks = np.full((stop - start, 10), np.nan)
            landmarks[found.astype(np.int64) - start] = np.stack(self.found_landmarks[span])
            if np.isnan(landmarks).all():
                raise ItemFailure(
                    FailureKind.MODEL, f"{cfg.detector} gave no landmarks to align on"
                )
            affines = aligned_affines(
                landmarks, px, cfg.margin, cfg.smoothing, cfg.smoothing_window_frames
            )[lo - start : hi - start]
            return (affines, *affine_square(affines, px))
        frames = np.arange(start, stop, dtype=np.float64)
        known = np.stack(self.found_boxes[span])
        boxes = interpolate_rows(frames, found, known)
        cx, cy, side = smooth_track(boxes, cfg.smoothing, cfg.smoothing_window_frames)
        xs, ys, sizes = crop_windows(
            cx[lo - start : hi - start],
            cy[lo - start : hi - start],
            side[lo - start : hi - start],
            cfg.margin,
        )
        return box_affines(xs, ys, sizes, px), xs, ys, sizes
