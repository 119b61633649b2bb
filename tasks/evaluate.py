"""Evaluate stage: PSNR and SSIM of each generated clip against its ground-truth face crops.

Both videos are decoded as streams, in lockstep, one chunk at a time (a clip is never
held in memory whole). Frames are compared at the ground truth's size (generated frames
are resized with area / cubic interpolation when sizes differ) on uint8 RGB:

- PSNR per frame ``10·log10(255² / MSE)`` in dB, capped at :data:`PSNR_CAP_DB` for
  identical frames (MSE 0 would be infinite, which JSON and averages cannot hold);
- SSIM per frame with ``skimage.metrics.structural_similarity(channel_axis=2,
  data_range=255)`` (7×7 uniform window, the skimage default);

both averaged over frames (the per-frame mean, as talking-head papers report). These
only mean something in self-reconstruction, which is what the generate stage produces.
The two streams may differ by ``max_frame_mismatch`` frames (an encoder's last frame);
more is ``MISALIGNED``. Extra frames are ignored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field
from skimage.metrics import structural_similarity

from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs, Stage, StageConfig
from tasks.media import iter_frames, probe
from tasks.records import ClipMetrics, FaceTrack, GeneratedClip

PSNR_CAP_DB = 100.0


class EvaluateConfig(StageConfig):
    max_frame_mismatch: int = Field(1, ge=0, description="allowed frame-count difference")
    chunk_frames: int = Field(16, ge=1, description="frames decoded per read")


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images (peak 255), capped at :data:`PSNR_CAP_DB`."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def _single_frames(path: Path, chunk: int) -> Iterator[np.ndarray]:
    info = probe(path)
    for block in iter_frames(path, info.width, info.height, chunk=chunk):
        yield from block


def _to_size(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    shrink = frame.shape[0] > height
    interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return cv2.resize(frame, (width, height), interpolation=interp)


def compare_videos(
    generated: Path, truth: Path, chunk_frames: int = 16
) -> tuple[int, int, float, float]:
    """``(generated frames, truth frames, mean PSNR dB, mean SSIM)`` over paired frames."""
    psnrs: list[float] = []
    ssims: list[float] = []
    n_gen = n_gt = 0
    gen_it = _single_frames(generated, chunk_frames)
    gt_it = _single_frames(truth, chunk_frames)
    with contextlib.closing(gen_it), contextlib.closing(gt_it):
        for g, t in zip_longest(gen_it, gt_it):
            n_gen += g is not None
            n_gt += t is not None
            if g is None or t is None:
                continue
            g = _to_size(g, t.shape[0], t.shape[1])
            psnrs.append(psnr_db(g, t))
            ssims.append(ssim(g, t))
    if not psnrs:
        return n_gen, n_gt, float("nan"), float("nan")
    return n_gen, n_gt, float(np.mean(psnrs)), float(np.mean(ssims))


class EvaluateStage(Stage[EvaluateConfig]):
    """Per generated clip: mean PSNR / SSIM against the ground-truth face crops."""

    name: ClassVar[str] = "evaluate"
    code_version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("faces", "generate")
    config_type: ClassVar[type[StageConfig]] = EvaluateConfig

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> ClipMetrics:
        gen = inputs.get("generate", GeneratedClip)
        face = inputs.get("faces", FaceTrack)
        n_gen, n_gt, psnr, ssim_mean = compare_videos(
            ctx.local_path(gen.video), ctx.local_path(face.crops), self.config.chunk_frames
        )
        if abs(n_gen - n_gt) > self.config.max_frame_mismatch:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"{gen.clip_id}: generated {n_gen} frames, ground truth {n_gt}",
            )
        if min(n_gen, n_gt) == 0:
            raise ItemFailure(FailureKind.FORMAT, f"{gen.clip_id}: no frames to compare")
        return ClipMetrics(
            clip_id=gen.clip_id, num_frames=min(n_gen, n_gt), psnr_db=psnr, ssim=ssim_mean
        )
