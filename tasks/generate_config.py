"""The generate stage's typed config: batching, video quality, settings, checkpoints, baselines.

Apart from :mod:`tasks.generate` so that validating a pipeline config imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.registry import ModelSpec
from tasks.base import StageConfig


class BaselineWeights(BaseModel):
    """Official weights generated through a family like a checkpoint (``load_official``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the checkpoint label in the tables")
    family: str = Field(min_length=1, description="the model family that samples them")
    weights: ModelSpec


class GenerateConfig(StageConfig):
    batch_size: int = Field(16, ge=1, description="frames per sample / VAE decode call")
    crf: int = Field(17, ge=0, le=51, description="x264 quality of the generated mp4s")
    reference_frame: int = Field(0, ge=0, description="clip frame used as identity reference")
    settings: list[Literal["self", "cross"]] = Field(
        default_factory=lambda: ["self", "cross"], min_length=1
    )
    checkpoints: Literal["all", "current"] = Field(
        "all", description="every committed train checkpoint, or only the current one"
    )
    baselines: list[BaselineWeights] = Field(default_factory=list)
