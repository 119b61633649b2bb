"""Audio-video offset of a clip: SyncNet when configured, else an offline estimator.

Sign convention (both methods): ``offset > 0`` means the audio lags the video (the sound
of a mouth movement comes ``offset`` later); re-aligning advances the audio by as much.
syncnet_python prints the opposite sign as "AV offset" (LatentSync delays the audio by it
with ``-itsoffset``). Both methods search lags of ±15 frames (600 ms at 25 fps).

- :func:`estimate_av_offset_xcorr`, **an offline heuristic, not SyncNet**: the
  cross-correlation of a mouth-motion signal with the speech envelope. Motion for the
  interval between frames ``i`` and ``i + 1`` is the registered mean abs change of the
  mouth region of the face crops (as the ``lip_motion`` rule measures it), clipped at its
  95th percentile against residual head jerks; the envelope for the same interval is the
  RMS of the samples in ``[i / fps, (i + 1) / fps)``. The offset is the lag of the highest
  Pearson correlation, refined to a fraction of a frame by a parabola through the peak.
  Confidence is a z-score: the peak against the correlations at every circular shift
  beyond the search range (alignments known to be wrong), ``(peak − mean) / std``; there
  must be at least as many of those as searched lags, so the clip needs 62 frame
  intervals (2.5 s at 25 fps): on a 2.2 s generated clip whose mouth opens at a fixed
  rhythm under unrelated speech the z-score, from 23 wrong alignments, reached 3.03.
  Measured on the five real fixture clips (4.9–6.6 s, 25 fps): with their audio shifted
  by 0, ±120 and ±200 ms every estimate moved with the shift to within 15 ms, at z
  3.4–4.5; video of one clip against the audio of another gave z 0.4–3.25 (2 of 20 pairs
  above 3.0). Unshifted, three clips measure +61 to +67 ms, one −65 ms and one +261 ms
  (face_1, a variable-frame-rate source; its true offset is unknown). A generated face
  whose mouth opens with the loudness around each frame time measures +28 ms: the mouth
  moves most while a syllable gets louder, so in-sync clips read about +30 to +65 ms.
  This estimator is a screen for gross offsets; SyncNet is the reference when its
  weights are available.
- :class:`~metrics.sync.SyncNetScorer` (the metrics package's scorer, which the evaluate
  stage's Sync-C/Sync-D use too; :func:`syncnet_offset` streams a clip into it): the
  SyncNet of :mod:`models.syncnet` on 224 px crops cut from
  the face crops with syncnet_python's ``crop_video`` geometry (side 1.4 × the face box,
  from the box top to 0.9 box sides below its centre), MFCC windows of the 16 kHz audio;
  25 fps only. What the face crop does not cover is gray 110, the reference's padding:
  the default faces margin (crop = 1.5 × the box) leaves a band of about 0.15 box sides
  at the bottom; ``faces.margin ≥ 0.8`` avoids it. Confidence is Sync-C (LatentSync keeps
  clips with ``conf ≥ 3``).
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from metrics.sync import MAX_LAG_FRAMES, OffsetEstimate, SyncNetScorer
from metrics.sync import syncnet_crop_affines as _crop_affines
from metrics.sync import unmeasurable as _unmeasurable
from tasks.media import iter_frames
from tasks.quality_measures import AFFINE_COLUMNS, Roi, _registered_change
from tasks.records import RuleResult

MIN_SURROGATES = 2 * MAX_LAG_FRAMES + 1  # as many known-wrong alignments as searched lags
MOTION_CLIP_PERCENTILE = 95.0
SILENT_RMS = 1e-4  # −80 dBFS: below this everywhere the clip has no audio to align


def mouth_motion(crops: Path, crop_px: int, roi: Roi) -> np.ndarray:
    """Registered mean abs change of the mouth region from frame ``i`` to ``i + 1``."""
    window = cv2.createHanningWindow((crop_px, crop_px), cv2.CV_32F)
    mouth = (slice(roi.y0, roi.y1), slice(roi.x0, roi.x1))
    motion: list[float] = []
    prev: np.ndarray | None = None
    with closing(iter_frames(crops, crop_px, crop_px)) as frames:
        for chunk in frames:
            for frame in chunk:
                gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
                if prev is not None:
                    motion.append(_registered_change(prev, gray, window, mouth))
                prev = gray
    return np.asarray(motion)


def speech_envelope(samples: np.ndarray, rate_hz: int, fps: float, count: int) -> np.ndarray:
    """RMS of ``samples`` over ``[i / fps, (i + 1) / fps)`` for ``i < count`` (0 past the end)."""
    bounds = np.round(np.arange(count + 1) * rate_hz / fps).astype(np.int64)
    bounds = np.minimum(bounds, len(samples))
    sq = np.concatenate([[0.0], np.cumsum(np.asarray(samples, dtype=np.float64) ** 2)])
    width = np.maximum(np.diff(bounds), 1)
    return np.sqrt((sq[bounds[1:]] - sq[bounds[:-1]]) / width)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def estimate_av_offset_xcorr(
    motion: np.ndarray, envelope: np.ndarray, fps: float, max_lag: int = MAX_LAG_FRAMES
) -> OffsetEstimate:
    """The offline motion/envelope cross-correlation estimate (see module docstring).

    ``motion[i]`` and ``envelope[i]`` describe the same interval between frames ``i`` and
    ``i + 1``; lag ``k`` pairs ``motion[i]`` with ``envelope[i + k]``.
    """
    method = "xcorr"
    n = min(len(motion), len(envelope))
    need = 2 * max_lag + 1 + MIN_SURROGATES
    if n < need:
        return _unmeasurable(method, f"{n} frame intervals < {need} for a ±{max_lag}-frame search")
    env = np.asarray(envelope[:n], dtype=np.float64)
    if env.max() < SILENT_RMS or env.std() == 0:
        return _unmeasurable(method, "no audio signal")
    mot = np.asarray(motion[:n], dtype=np.float64)
    mot = np.minimum(mot, np.percentile(mot, MOTION_CLIP_PERCENTILE))
    if mot.std() < 1e-6:
        return _unmeasurable(method, "no mouth motion")
    lags = range(-max_lag, max_lag + 1)
    corr = np.array(
        [_pearson(mot[max(0, -k) : n - max(0, k)], env[max(0, k) : n + min(0, k)]) for k in lags]
    )
    best = int(np.argmax(corr))
    frac = 0.0
    if 0 < best < len(corr) - 1:
        curvature = corr[best - 1] - 2 * corr[best] + corr[best + 1]
        if curvature < 0:
            frac = 0.5 * (corr[best - 1] - corr[best + 1]) / curvature
    wrong = np.array([_pearson(mot, np.roll(env, -k)) for k in range(max_lag + 1, n - max_lag)])
    spread = float(wrong.std())
    z = (float(corr[best]) - float(wrong.mean())) / spread if spread > 0 else 0.0
    offset = best - max_lag + frac
    return OffsetEstimate(
        method=method,
        offset_frames=offset,
        offset_ms=1000.0 * offset / fps,
        confidence=z,
        score=float(corr[best]),
        at_search_edge=best in (0, len(corr) - 1),
    )


def xcorr_offset(
    crops: Path, crop_px: int, roi: Roi, samples: np.ndarray, rate_hz: int, fps: float
) -> OffsetEstimate:
    """:func:`estimate_av_offset_xcorr` of a clip's face crops and audio."""
    motion = mouth_motion(crops, crop_px, roi)
    return estimate_av_offset_xcorr(
        motion, speech_envelope(samples, rate_hz, fps, len(motion)), fps
    )


def syncnet_crop_affines(boxes: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`metrics.sync.syncnet_crop_affines` of a ``boxes.parquet`` table's columns."""
    m = np.stack([boxes[c].astype(np.float64) for c in AFFINE_COLUMNS], axis=1).reshape(-1, 2, 3)
    return _crop_affines(m, np.stack([boxes[c] for c in ("x1", "y1", "x2", "y2")], axis=1))


def syncnet_offset(
    scorer: SyncNetScorer,
    crops: Path,
    crop_px: int,
    boxes: dict[str, np.ndarray],
    samples: np.ndarray,
    rate_hz: int,
    fps: float,
) -> OffsetEstimate:
    """The scorer's measurement of a clip, its face crops streamed from ``crops``."""
    with closing(iter_frames(crops, crop_px, crop_px)) as chunks:
        frames = (frame for chunk in chunks for frame in chunk)
        return scorer.measure(frames, syncnet_crop_affines(boxes), samples, rate_hz, fps)


def shift_audio(samples: np.ndarray, rate_hz: int, shift_ms: float) -> np.ndarray:
    """``samples`` delayed by ``shift_ms`` (negative: advanced), same length, zero-filled.

    Re-aligning a clip measured at offset ``d`` is ``shift_audio(samples, rate, -d)``.
    """
    s = round(shift_ms * rate_hz / 1000.0)
    out = np.zeros_like(samples)
    if s >= 0:
        out[s:] = samples[: max(len(samples) - s, 0)]
    else:
        out[: max(len(samples) + s, 0)] = samples[-s:]
    return out


@dataclass(frozen=True, slots=True)
class AvOffsetDecision:
    rule: RuleResult
    audio_shift_ms: float  # applied to the clip's audio when re-aligned, else 0


def judge_av_offset(
    est: OffsetEstimate,
    max_offset_ms: float,
    min_confidence: float,
    realign: bool,
    hard: bool,
) -> AvOffsetDecision:
    """The ``av_offset`` rule: value is the signed offset (ms), ``|value| ≤ threshold`` passes.

    An estimate that is missing or below ``min_confidence`` passes *unmeasured*
    (``measured=False``, reason ``"unmeasured offset (...)"``; a clip is never rejected on a
    guess), which the ``quality_rules`` view counts apart from measured passes. A confident offset
    beyond the threshold fails, or with ``realign`` passes with the audio shifted back
    (not at the edge of the search range, where the true offset may lie further out).
    """

    def result(
        value: float, passed: bool, reason: str, shift_ms: float = 0.0, measured: bool = True
    ) -> AvOffsetDecision:
        rule = RuleResult(
            rule="av_offset",
            value=float(value),
            threshold=float(max_offset_ms),
            passed=passed,
            hard=hard,
            reason=reason,
            measured=measured,
        )
        return AvOffsetDecision(rule, shift_ms)

    if est.unmeasurable:
        return result(
            0.0, True, f"unmeasured offset ({est.method}: {est.unmeasurable})", measured=False
        )
    off = est.offset_ms
    if est.confidence < min_confidence:
        return result(
            off,
            True,
            f"unmeasured offset (confidence {est.confidence:.2f} < {min_confidence:.2f}; "
            f"{est.method} best guess {off:+.0f} ms)",
            measured=False,
        )
    if abs(off) <= max_offset_ms:
        return result(off, True, "")
    side = "audio lags video" if off > 0 else "audio leads video"
    what = (
        f"audio-video offset {off:+.0f} ms ({side}) beyond ±{max_offset_ms:.0f} ms "
        f"({est.method}, confidence {est.confidence:.2f})"
    )
    if realign and not est.at_search_edge:
        return result(off, True, f"re-aligned: audio shifted by {-off:+.0f} ms; {what}", -off)
    return result(off, False, what)
