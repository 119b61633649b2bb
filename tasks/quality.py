"""Quality stage: measurable rules that decide whether a clip becomes training data.

Every rule records its measured value, its threshold and a human-readable reason, so the
catalog's ``quality`` stats table answers "why was this clip dropped?" with SQL. Hard rules
reject the clip (the verdict's ``rejection_reason`` marks it ``filtered``); a rule listed in
``soft_rules`` is still measured but only multiplies the clip's sampling weight by
``soft_fail_weight`` when it fails.

Rules (all hard by default):

- ``duration``: clip duration ≥ ``min_duration_s``.
- ``face_size``: median side of the detected main face ≥ ``min_face_size_px`` (design notes:
  256 px, as in LatentSync's earlier "face smaller than 256×256" filter; small sample videos
  need a lower value in their config).
- ``multi_face``: the largest other face stays below ``max_second_face_ratio`` × the main
  face's side on every detection frame ("more than one face of comparable size").
- ``blur``: median over ``blur_sample_frames`` evenly spaced crops of the variance of the
  Laplacian of the grayscale central face region ≥ ``min_blur_laplacian_var``. The measure
  is taken on the crops as training sees them, so a small face upsampled to the crop size
  counts as blurry too. Calibration (256 px crops, crf 17): the five real fixture clips
  measure 23–385; a Gaussian blur of σ = 6 px on a 150 px face measures ≈ 11 at 128 px, and
  h264 noise keeps even very blurred crops near 10, so the default threshold is 15.
- ``face_lost``: share of frames where the face was not seen (interpolated across short
  gaps) ≤ ``max_lost_fraction``.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from tasks.base import ItemContext, ItemInputs, Stage, StageConfig
from tasks.media import iter_frames
from tasks.records import FaceTrack, NormalizedClip, QualityVerdict, RuleResult

RuleName = Literal["duration", "face_size", "multi_face", "blur", "face_lost"]
RULES: tuple[str, ...] = ("duration", "face_size", "multi_face", "blur", "face_lost")


class QualityConfig(StageConfig):
    """Thresholds of the quality rules (see module docstring)."""

    min_duration_s: float = Field(2.0, ge=0.0)
    min_face_size_px: float = Field(256.0, ge=0.0)
    max_second_face_ratio: float = Field(0.5, gt=0.0)
    min_blur_laplacian_var: float = Field(15.0, ge=0.0)
    max_lost_fraction: float = Field(0.3, ge=0.0, le=1.0)
    blur_sample_frames: int = Field(16, ge=1)
    blur_center_fraction: float = Field(
        0.6, gt=0.0, le=1.0, description="side of the central crop region measured for blur"
    )
    soft_rules: tuple[RuleName, ...] = ()
    soft_fail_weight: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("soft_rules")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(v)))


def laplacian_variance(rgb: np.ndarray, center_fraction: float = 1.0) -> float:
    """Variance of the Laplacian of the grayscale central square of an RGB uint8 image."""
    h, w = rgb.shape[:2]
    side_h, side_w = max(1, round(h * center_fraction)), max(1, round(w * center_fraction))
    y0, x0 = (h - side_h) // 2, (w - side_w) // 2
    gray = cv2.cvtColor(
        np.ascontiguousarray(rgb[y0 : y0 + side_h, x0 : x0 + side_w]), cv2.COLOR_RGB2GRAY
    )
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def sampled_blur(
    crops: Path, size_px: int, num_frames: int, samples: int, center_fraction: float
) -> float:
    """Median Laplacian variance over ``samples`` evenly spaced frames, decoded as a stream."""
    wanted = set(np.unique(np.linspace(0, max(num_frames - 1, 0), samples).round().astype(int)))
    values: list[float] = []
    n = 0
    with closing(iter_frames(crops, size_px, size_px)) as frames:
        for chunk in frames:
            for j in range(chunk.shape[0]):
                if n + j in wanted:
                    values.append(laplacian_variance(chunk[j], center_fraction))
            n += chunk.shape[0]
            if n > max(wanted):
                break  # closing() stops the decoder
    return float(np.median(values)) if values else 0.0


class QualityStage(Stage[QualityConfig]):
    """Applies the rules to a clip and its face track; returns a :class:`QualityVerdict`."""

    name = "quality"
    code_version = "1"
    requires = ("download", "faces")
    config_type = QualityConfig

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> QualityVerdict:
        cfg = self.config
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        blur = sampled_blur(
            ctx.local_path(face.crops),
            face.crop_size_px,
            face.num_frames,
            cfg.blur_sample_frames,
            cfg.blur_center_fraction,
        )
        lost = face.lost_frames / face.num_frames if face.num_frames else 1.0
        rules = [
            self._rule(
                "duration",
                clip.duration_s,
                cfg.min_duration_s,
                clip.duration_s >= cfg.min_duration_s,
                f"duration {clip.duration_s:.2f} s < {cfg.min_duration_s:.2f} s",
            ),
            self._rule(
                "face_size",
                face.median_face_size_px,
                cfg.min_face_size_px,
                face.median_face_size_px >= cfg.min_face_size_px,
                f"face {face.median_face_size_px:.0f} px < {cfg.min_face_size_px:.0f} px",
            ),
            self._rule(
                "multi_face",
                face.max_second_face_ratio,
                cfg.max_second_face_ratio,
                face.max_second_face_ratio < cfg.max_second_face_ratio,
                f"second face {face.max_second_face_ratio:.2f} of the main face's size "
                f">= {cfg.max_second_face_ratio:.2f} ({face.max_faces_in_frame} faces in a frame)",
            ),
            self._rule(
                "blur",
                blur,
                cfg.min_blur_laplacian_var,
                blur >= cfg.min_blur_laplacian_var,
                f"Laplacian variance {blur:.1f} < {cfg.min_blur_laplacian_var:.1f} (blurry)",
            ),
            self._rule(
                "face_lost",
                lost,
                cfg.max_lost_fraction,
                lost <= cfg.max_lost_fraction,
                f"face lost in {lost:.0%} of frames > {cfg.max_lost_fraction:.0%}",
            ),
        ]
        accepted = all(r.passed for r in rules if r.hard)
        weight = 1.0
        for r in rules:
            if not r.hard and not r.passed:
                weight *= cfg.soft_fail_weight
        return QualityVerdict(
            clip_id=clip.clip_id, accepted=accepted, sampling_weight=weight, rules=rules
        )

    def _rule(
        self, rule: str, value: float, threshold: float, passed: bool, reason: str
    ) -> RuleResult:
        return RuleResult(
            rule=rule,
            value=float(value),
            threshold=float(threshold),
            passed=bool(passed),
            hard=rule not in self.config.soft_rules,
            reason="" if passed else reason,
        )
