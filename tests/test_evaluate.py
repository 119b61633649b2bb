"""Evaluate stage: PSNR/SSIM on decoded streams, alignment checks, size handling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from storage.store import ArtifactStore
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs, StageEnv
from tasks.evaluate import PSNR_CAP_DB, EvaluateConfig, EvaluateStage, psnr_db
from tasks.media import VideoWriter, iter_frames
from tasks.records import ClipMetrics, FaceTrack, GeneratedClip
from tests.train_helpers import face_frames

FPS = 25.0


def _write(path: Path, frames: np.ndarray, crf: int = 17) -> Path:
    h, w = frames.shape[1:3]
    with VideoWriter(path, w, h, FPS, crf=crf) as vw:
        vw.write(frames)
    return path


def _decode(path: Path, size: int) -> np.ndarray:
    return np.concatenate(list(iter_frames(path, size, size)))


def _run(tmp_path: Path, gen_video: Path, gt_video: Path, n_gen: int, n_gt: int, size: int):
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")
    store = ArtifactStore(env.store_uri)
    fctx = ItemContext(store, "faces", "c1", "f" * 40)
    crops = fctx.commit(gt_video, "crops.mp4", "video")
    face = FaceTrack(
        clip_id="c1",
        fps=FPS,
        num_frames=n_gt,
        crop_size_px=size,
        crops=crops,
        boxes=crops,
        detector="synthetic",
        detected_frames=n_gt,
        tracked_frames=0,
        lost_frames=0,
        median_face_size_px=float(size),
        min_face_size_px=float(size),
        max_faces_in_frame=1,
        max_second_face_ratio=0.0,
    )
    gctx = ItemContext(store, "generate", "c1", "g" * 40)
    gen = GeneratedClip(
        clip_id="c1",
        video=gctx.commit(gen_video, "generated.mp4", "video"),
        num_frames=n_gen,
        fps=FPS,
        crop_size_px=size,
    )
    stage = EvaluateStage(EvaluateConfig(chunk_frames=5), env)
    stage.setup()
    ctx = ItemContext(store, "evaluate", "c1", "e" * 40)
    try:
        return stage.process(
            ItemInputs(item_id="c1", records={"faces": face, "generate": gen}), ctx
        )
    finally:
        ctx.close()


def test_identical_videos_give_ssim_one_and_capped_psnr(tmp_path):
    video = _write(tmp_path / "a.mp4", face_frames(12, 64))
    rec = _run(tmp_path, video, video, 12, 12, 64)
    assert isinstance(rec, ClipMetrics)
    assert rec.num_frames == 12
    assert rec.ssim == pytest.approx(1.0, abs=1e-9)
    assert rec.psnr_db == PSNR_CAP_DB
    ClipMetrics.model_validate_json(rec.model_dump_json())  # finite, JSON-safe


def test_known_noise_matches_hand_computed_psnr_and_ssim(tmp_path):
    clean = face_frames(10, 64, seed=1)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean.astype(np.float64) + rng.normal(0, 12, clean.shape), 0, 255)
    gt = _write(tmp_path / "gt.mp4", clean, crf=0)
    gen = _write(tmp_path / "gen.mp4", noisy.astype(np.uint8), crf=0)
    rec = _run(tmp_path, gen, gt, 10, 10, 64)

    a, b = _decode(gen, 64).astype(np.float64), _decode(gt, 64).astype(np.float64)
    mse = ((a - b) ** 2).reshape(10, -1).mean(axis=1)
    by_hand = float(np.mean(10 * np.log10(255.0**2 / mse)))
    ssim_hand = np.mean(
        [
            structural_similarity(x, y, channel_axis=2, data_range=255)
            for x, y in zip(a.astype(np.uint8), b.astype(np.uint8), strict=True)
        ]
    )
    assert rec.psnr_db == pytest.approx(by_hand, abs=1e-6)
    assert rec.ssim == pytest.approx(ssim_hand, abs=1e-9)
    # the decoded noise is still roughly the σ=12 we added (20·log10(255/12) ≈ 26.5 dB)
    assert 22.0 < rec.psnr_db < 31.0
    assert 0.0 < rec.ssim < 0.9


def test_psnr_formula():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr_db(a, a) == PSNR_CAP_DB


def test_one_extra_frame_is_tolerated_more_is_misaligned(tmp_path):
    frames = face_frames(14, 64)
    gt = _write(tmp_path / "gt.mp4", frames[:10])
    plus_one = _write(tmp_path / "g11.mp4", frames[:11])
    rec = _run(tmp_path / "a", plus_one, gt, 11, 10, 64)
    assert rec.num_frames == 10
    plus_four = _write(tmp_path / "g14.mp4", frames)
    with pytest.raises(ItemFailure) as exc:
        _run(tmp_path / "b", plus_four, gt, 14, 10, 64)
    assert exc.value.kind == FailureKind.MISALIGNED


def test_generated_at_another_size_is_compared_at_ground_truth_size(tmp_path):
    big = face_frames(8, 96, seed=2)
    small = np.stack([_resize(f, 64) for f in big])
    rec = _run(
        tmp_path, _write(tmp_path / "s.mp4", small), _write(tmp_path / "b.mp4", big), 8, 8, 96
    )
    assert rec.num_frames == 8
    assert 20.0 < rec.psnr_db < PSNR_CAP_DB
    assert rec.ssim > 0.5


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
