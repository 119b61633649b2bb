"""The faces stage's typed config: detector, tracking, gap tolerance and crop geometry.

Apart from :mod:`tasks.faces` so that validating a pipeline config imports no detector.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tasks.base import Resources, StageConfig


class FacesConfig(StageConfig):
    """Detector choice, tracking, gap tolerance and crop geometry."""

    detector: Literal["mtcnn", "retinaface"] = "mtcnn"
    retinaface_weights: str | None = Field(
        None, description="state dict or hub zip; relative to data_root; None = torch hub cache"
    )
    retinaface_flavour: Literal["auto", "retinaface-pytorch", "biubug6"] = Field(
        "auto",
        description="input normalisation the RetinaFace weights were trained with; auto "
        "decides from the file (see models.retinaface_weights)",
    )
    detect_every_k: int = Field(5, ge=1, description="run the detector on every k-th frame")
    detect_max_side_px: int = Field(480, ge=64, description="frames are detected at this size")
    detect_min_face_px: int = Field(
        40, ge=12, description="smallest face searched (MTCNN), in detection-size pixels"
    )
    adaptive_detection: bool = Field(
        True,
        description="while the main face is tracked, detect keyframes at a size adapted to "
        "it (MTCNN only; see tasks.faces_keyframes)",
    )
    adaptive_face_px: int = Field(
        64, ge=24, description="main face size on adaptive keyframes, in detection pixels"
    )
    adaptive_min_face_ratio: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="adaptive keyframes find faces from this x the main face up; keep it "
        "below quality.max_second_face_ratio",
    )
    min_detection_score: float = Field(0.9, ge=0.0, le=1.0)
    min_track_iou: float = Field(0.3, ge=0.0, le=1.0, description="IoU to continue the track")
    max_gap_frames: int = Field(15, ge=0, description="longer gaps fail with FACE_LOST")
    crop_size_px: int = Field(256, ge=32, le=2048)
    margin: float = Field(0.5, ge=0.0, le=3.0, description="crop side = face side × (1+margin)")
    smoothing: Literal["none", "moving_average"] = "moving_average"
    smoothing_window_frames: int = Field(9, ge=1, description="odd; centred window")
    pad_mode: Literal["constant", "edge"] = "constant"  # black or edge pixels outside frame
    align: Literal["box", "landmarks"] = Field(
        "box", description="square box crops, or similarity-aligned to a 5-point template"
    )
    encode_preset: Literal["superfast", "veryfast", "faster", "fast", "medium"] = Field(
        "superfast",
        description="x264 preset of crops.mp4, always at crf 17: on the 256 px fixture crops "
        "superfast takes ~0.75x veryfast's encoder CPU for ~1.7x the bytes at a higher PSNR "
        "(45.3 vs 44.1 dB). Not ultrafast: it turns the deblocking filter off, and blocking "
        "lifts the quality stage's blur measure over its threshold on blurred faces",
    )
    shot_min_content: float = Field(15.0, ge=0.0, description="min HSV change for a cut")
    shot_adaptive_ratio: float = Field(
        3.0, ge=1.0, description="a cut's change vs its neighbours' (see faces_shots)"
    )
    resources: Resources = Resources(batch_size=16)

    @field_validator("crop_size_px")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("crop_size_px must be even (yuv420p)")
        return v

    @field_validator("smoothing_window_frames")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("smoothing_window_frames must be odd (centred window)")
        return v
