"""The evaluate stage's typed config: frame tolerance, decoding, metrics and their networks.

Apart from :mod:`tasks.evaluate` so that validating a pipeline config imports no metric
network.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from metrics.registry import METRICS
from models.registry import ModelSpec
from tasks.base import StageConfig


def _tiny(family: str) -> ModelSpec:
    return ModelSpec(family=family, source=f"models/{family}-tiny", tiny_random=True)


class EvaluateConfig(StageConfig):
    max_frame_mismatch: int = Field(1, ge=0, description="allowed frame-count difference")
    chunk_frames: int = Field(16, ge=1, description="frames decoded per read")
    metrics: list[str] = Field(
        default_factory=lambda: list(METRICS), description="metrics to compute (registry names)"
    )
    face_margin: float = Field(
        0.5, ge=0.0, description="clips without landmarks: ArcFace square = crop / (1 + margin)"
    )
    fid_frame_stride: int = Field(1, ge=1, description="Inception features of every n-th frame")
    lpips_alex: ModelSpec = _tiny("lpips-alex")
    lpips_vgg: ModelSpec = _tiny("lpips-vgg")
    inception: ModelSpec = _tiny("inception-fid")
    i3d: ModelSpec = _tiny("i3d")
    arcface: ModelSpec = _tiny("arcface")
    motion: ModelSpec = _tiny("liveportrait-motion")
    syncnet: ModelSpec = _tiny("syncnet")

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
        return v

    def network_specs(self) -> dict[str, ModelSpec]:
        """Model family → spec, for the networks the enabled metrics need."""
        specs = [self.lpips_alex, self.lpips_vgg, self.inception, self.i3d, self.arcface,
                 self.motion, self.syncnet]  # fmt: skip
        need = {METRICS[m].network for m in self.metrics}
        return {s.family: s for s in specs if s.family in need}
