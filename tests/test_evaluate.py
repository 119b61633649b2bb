"""Evaluate stages: pixel metrics on decoded videos, alignment checks, size handling; every
metric with random-init networks and the ground-truth row; FID/FVD of the set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage.metrics import structural_similarity

from metrics.image import PSNR_CAP_DB, psnr_db
from metrics.registry import METRICS, Level
from storage.store import ArtifactStore
from tasks.base import (
    AggregateInputs,
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    StageEnv,
)
from tasks.evaluate import EvaluateConfig, EvaluateStage
from tasks.evaluate_set import EvaluateSetConfig, EvaluateSetStage
from tasks.media import VideoWriter, iter_frames, write_wav
from tasks.records import (
    ClipFeatures,
    ClipMetrics,
    EvalSetMetrics,
    FaceTrack,
    GeneratedClip,
    TrainedCheckpoint,
)
from tests.train_helpers import face_frames

FPS = 25.0
PIXEL = ["psnr_db", "ssim"]


def _write(path: Path, frames: np.ndarray, crf: int = 17) -> Path:
    h, w = frames.shape[1:3]
    with VideoWriter(path, w, h, FPS, crf=crf) as vw:
        vw.write(frames)
    return path


def _decode(path: Path, size: int) -> np.ndarray:
    return np.concatenate(list(iter_frames(path, size, size)))


def _boxes(path: Path, n: int, size: int) -> Path:
    cols = {"frame": np.arange(n), "x1": [size * 0.2] * n, "y1": [size * 0.15] * n,
            "x2": [size * 0.8] * n, "y2": [size * 0.75] * n, "m00": [1.0] * n, "m01": [0.0] * n,
            "m02": [0.0] * n, "m10": [0.0] * n, "m11": [1.0] * n, "m12": [0.0] * n}  # fmt: skip
    pq.write_table(pa.table(cols), path)
    return path


def _run(
    tmp_path: Path,
    gen_video: Path,
    gt_video: Path,
    n_gen: int,
    n_gt: int,
    size: int,
    metrics: list[str] = PIXEL,
    clip_id: str = "c1",
    stage: EvaluateStage | None = None,
) -> ClipMetrics:
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")
    store = ArtifactStore(env.store_uri)
    fctx = ItemContext(store, "faces", clip_id, "f" * 40)
    crops = fctx.commit(gt_video, "crops.mp4", "video")
    boxes = fctx.commit(_boxes(tmp_path / f"{clip_id}-boxes.parquet", n_gt, size), "b.parquet", "t")
    face = FaceTrack(
        clip_id=clip_id,
        fps=FPS,
        num_frames=n_gt,
        crop_size_px=size,
        crops=crops,
        boxes=boxes,
        detector="synthetic",
        detected_frames=n_gt,
        tracked_frames=0,
        lost_frames=0,
        median_face_size_px=float(size),
        min_face_size_px=float(size),
        max_faces_in_frame=1,
        max_second_face_ratio=0.0,
    )
    t = np.arange(int(n_gt * 640)) / 16000
    wav = tmp_path / f"{clip_id}.wav"
    write_wav(wav, 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)), 16000)
    xctx = ItemContext(store, "features", clip_id, "x" * 40)
    feats = ClipFeatures(
        clip_id=clip_id, fps=FPS, num_frames=n_gt, files=[],
        audio=xctx.commit(wav, "audio.wav", "audio"), audio_source="original",
    )  # fmt: skip
    tctx = ItemContext(store, "train", "train", "t" * 40)
    ckpt_file = tmp_path / "ckpt.bin"
    ckpt_file.write_bytes(b"weights")
    ckpt = TrainedCheckpoint(
        family="musetalk15", checkpoint=tctx.commit(ckpt_file, "ckpt", "model"),
        model_config_json="{}", steps=7, num_processes=1, train_clips=[], resumed_from_step=0,
        history=[],
    )  # fmt: skip
    gctx = ItemContext(store, "generate", clip_id, "g" * 40)
    gen = GeneratedClip(
        clip_id=clip_id,
        video=gctx.commit(gen_video, "generated.mp4", "video"),
        num_frames=n_gen,
        fps=FPS,
        crop_size_px=size,
    )
    if stage is None:
        stage = EvaluateStage(EvaluateConfig(chunk_frames=5, metrics=metrics), env)
        stage.setup()
    ctx = ItemContext(store, "evaluate", clip_id, "e" * 40)
    try:
        records = {"faces": face, "features": feats, "generate": gen}
        return stage.process(
            ItemInputs(item_id=clip_id, records=records, shared={"train": ckpt}), ctx
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


def test_every_metric_with_random_init_networks_and_the_ground_truth_row(tmp_path):
    frames = face_frames(40, 64, seed=3)
    rng = np.random.default_rng(1)
    noisy = np.clip(frames + rng.normal(0, 10, frames.shape), 0, 255).astype(np.uint8)
    gt = _write(tmp_path / "gt.mp4", frames)
    gen = _write(tmp_path / "gen.mp4", noisy)
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")
    stage = EvaluateStage(EvaluateConfig(chunk_frames=8, fid_frame_stride=4), env)
    assert {s.family for s in stage.model_specs()} == {
        m.network for m in METRICS.values() if m.network
    }
    stage.setup()
    rec = _run(tmp_path, gen, gt, 40, 40, 64, stage=stage)
    assert set(rec.model_origins.values()) == {"random-init"}
    assert (rec.family, rec.checkpoint, rec.setting) == ("musetalk15", rec.checkpoint, "self")
    assert rec.checkpoint.startswith("step7-")
    clip_metrics = {m.name for m in METRICS.values() if m.level == Level.CLIP}
    assert clip_metrics <= set(rec.values) and clip_metrics <= set(rec.reference)
    ref = rec.reference
    assert ref["psnr_db"] == PSNR_CAP_DB and ref["ssim"] == pytest.approx(1.0)
    assert ref["lpips_alex"] == pytest.approx(0.0, abs=1e-6) and ref["apd_deg"] == 0.0
    assert rec.values["psnr_db"] < PSNR_CAP_DB and rec.values["lpips_vgg"] > 0
    assert ref["csim"] == pytest.approx(1.0) and rec.values["csim"] < 1.0
    assert "acd_at_32" in rec.values
    rows = rec.stats_rows()["eval_metrics"]
    assert {r["row"] for r in rows} == {"generated", "ground_truth"}
    assert {r["model_origin"] for r in rows} == {"random-init"}

    store = ArtifactStore(env.store_uri)
    agg = EvaluateSetStage(EvaluateSetConfig(), env)
    actx = ItemContext(store, "evaluate_set", "evaluate_set", "s" * 40)
    try:
        items = [ItemInputs(item_id="c1", records={"evaluate": rec})]
        out = agg.process(AggregateInputs(item_id="evaluate_set", items=items), actx)
    finally:
        actx.close()
    assert isinstance(out, EvalSetMetrics) and len(out.groups) == 1
    g = out.groups[0]
    assert g.values["fid"] > 0 and g.reference["fid"] == pytest.approx(0.0, abs=1e-6)
    assert g.values["fvd_at_32"] > 0 and g.reference["fvd_at_32"] == pytest.approx(0, abs=1e-6)
    assert any(n.startswith("fvd:") for n in g.notes)  # one clip: no covariance for FVD
    set_rows = out.stats_rows()["eval_metrics"]
    assert {r["level"] for r in set_rows} == {"set"} and {"fid", "fvd_at_32"} <= {
        r["metric"] for r in set_rows
    }
