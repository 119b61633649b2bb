"""Typed configuration of the ``musetalk15`` family (what ``train: {family: musetalk15}`` takes).

Pydantic only: the train stage's config union reads it without importing the network
(:mod:`generators.musetalk15.model`) or the family (:mod:`generators.musetalk15.family`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from generators.family_config import FamilyConfig

FAMILY = "musetalk15"


class Musetalk15Config(FamilyConfig):
    family: Literal["musetalk15"] = FAMILY
    audio_window_frames: int = Field(2, ge=0, le=16, description="w: frames t-w..t+w")
    unet: Literal["tiny", "full"] = Field(
        "tiny", description="tiny (~0.4 M params, CPU) or the full musetalk.json layout"
    )
