"""The engram stage's typed config: audio codebook, n-gram hashing and the k-means fit.

Apart from :mod:`tasks.engram` so that validating a pipeline config imports no torch or
scikit-learn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tasks.base import StageConfig


class EngramConfig(StageConfig):
    codebook_size: int = Field(16, ge=2, le=65_535, description="k-means audio codes")
    ngram_orders: list[int] = Field([2, 3], min_length=1, description="n-gram orders (≥ 2)")
    num_heads: int = Field(4, ge=1, le=64, description="hash heads per order")
    table_size: int = Field(257, ge=2, description="minimum prime table size per head")
    seed: int = 0
    mouth_rows: Literal["lower_half"] = "lower_half"
    kmeans_iters: int = Field(100, ge=1)
    kmeans_max_frames: int = Field(200_000, ge=1, description="seeded subsample for the fit")

    @field_validator("ngram_orders")
    @classmethod
    def _orders(cls, v: list[int]) -> list[int]:
        if any(n < 2 or n > 8 for n in v) or len(set(v)) != len(v):
            raise ValueError("ngram_orders must be distinct integers in 2..8")
        return sorted(v)
