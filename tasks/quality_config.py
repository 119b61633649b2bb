"""The quality stage's typed config: the rules' thresholds, and which rules are soft.

Apart from :mod:`tasks.quality` so that validating a pipeline config imports no model.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from tasks.base import StageConfig

RuleName = Literal[
    "duration",
    "face_size",
    "multi_face",
    "blur",
    "face_lost",
    "shot_change",
    "yaw",
    "lip_motion",
    "speech",
    "speech_floor",
    "snr",
    "av_offset",
]
RULES: tuple[str, ...] = get_args(RuleName)


class QualityConfig(StageConfig):
    """Thresholds of the quality rules (see :mod:`tasks.quality`)."""

    min_duration_s: float = Field(2.0, ge=0.0)
    min_face_size_px: float = Field(256.0, ge=0.0)
    max_second_face_ratio: float = Field(0.5, gt=0.0)
    min_blur_laplacian_var: float = Field(15.0, ge=0.0)
    max_lost_fraction: float = Field(0.3, ge=0.0, le=1.0)
    max_shot_changes: int = Field(0, ge=0)
    max_yaw_ratio: float = Field(0.35, gt=0.0)
    min_lip_motion: float = Field(1.6, ge=0.0, description="% of the mouth width per frame")
    min_speech_fraction: float = Field(0.3, ge=0.0, le=1.0)
    min_speech_fraction_floor: float = Field(
        0.05, ge=0.0, le=1.0, description="hard floor: below it a clip has nothing to learn"
    )
    min_snr_db: float = Field(15.0)
    blur_sample_frames: int = Field(16, ge=1)
    blur_center_fraction: float = Field(
        0.6, gt=0.0, le=1.0, description="side of the central crop region measured for blur"
    )
    max_av_offset_ms: float = Field(100.0, ge=0.0)
    av_offset_method: Literal["xcorr", "syncnet"] = "xcorr"
    syncnet_weights: str | None = Field(
        None, description="syncnet_v2.model (state dict) or its directory; relative to data_root"
    )
    min_av_offset_confidence: float = Field(
        3.0, ge=0.0, description="xcorr: peak z-score; syncnet: Sync-C"
    )
    realign_confident_offsets: bool = False
    soft_rules: tuple[RuleName, ...] = ("yaw", "lip_motion", "speech", "snr")
    soft_fail_weight: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("soft_rules")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _syncnet_needs_weights(self) -> QualityConfig:
        if self.av_offset_method == "syncnet" and not self.syncnet_weights:
            raise ValueError("av_offset_method 'syncnet' needs syncnet_weights (a local path)")
        return self
