"""SyncNet's input format (25 fps video, 16 kHz audio, 5-frame windows of 224 px crops) and
the registry spec of its weights: what planning and :mod:`metrics.sync`'s crop geometry need,
without torch. The network is in :mod:`models.syncnet`.
"""

from __future__ import annotations

from models.registry import ModelSpec

FPS = 25.0
SAMPLE_RATE_HZ = 16_000
LIP_FRAMES = 5
LIP_SIZE_PX = 224


def syncnet_model_spec(weights: str) -> ModelSpec:
    """The registry spec of a SyncNet weights file or directory (local path only)."""
    return ModelSpec(family="syncnet", source=weights)
