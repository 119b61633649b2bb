"""Evaluate stages: every generated video of a clip against the ground truth, the ground-truth
row, settings, per-video caching, landmark-aligned ArcFace faces, and the eval_summary table
with FID / FVD."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage.metrics import structural_similarity

from metrics.image import PSNR_CAP_DB, psnr_db
from metrics.registry import METRICS, Level, Setting
from storage.store import ArtifactStore
from tasks.base import AggregateInputs, FailureKind, ItemContext, ItemFailure, ItemInputs, StageEnv
from tasks.evaluate import ARCFACE_PX, EvaluateStage, arcface_affines
from tasks.evaluate_config import EvaluateConfig
from tasks.evaluate_set import EvaluateSetStage
from tasks.evaluate_set_config import EvaluateSetConfig
from tasks.faces_align import ARCFACE_TEMPLATE_112
from tasks.media import VideoWriter, iter_frames, write_wav
from tasks.records import ClipFeatures, ClipMetrics, EvalSetMetrics, FaceTrack, GeneratedClip
from tasks.records_eval import GROUND_TRUTH, GeneratedVideo
from tests.train_helpers import face_frames

FPS = 25.0
PIXEL = ["psnr_db", "ssim"]
CLIP_METRICS = {m.name for m in METRICS.values() if m.level == Level.CLIP}


def _write(path: Path, frames: np.ndarray, crf: int = 17) -> Path:
    h, w = frames.shape[1:3]
    with VideoWriter(path, w, h, FPS, crf=crf) as vw:
        vw.write(frames)
    return path


def _decode(path: Path, size: int) -> np.ndarray:
    return np.concatenate(list(iter_frames(path, size, size)))


def _boxes(path: Path, n: int, size: int, landmarks: np.ndarray | None = None) -> Path:
    cols = {"frame": np.arange(n), "x1": [size * 0.2] * n, "y1": [size * 0.15] * n,
            "x2": [size * 0.8] * n, "y2": [size * 0.75] * n, "m00": [1.0] * n, "m01": [0.0] * n,
            "m02": [0.0] * n, "m10": [0.0] * n, "m11": [1.0] * n, "m12": [0.0] * n}  # fmt: skip
    if landmarks is not None:
        for i in range(5):
            cols[f"lm_x{i}"], cols[f"lm_y{i}"] = landmarks[:, 2 * i], landmarks[:, 2 * i + 1]
    pq.write_table(pa.table(cols), path)
    return path


def _wav(path: Path, n: int, hz: float = 220.0) -> Path:
    t = np.arange(int(n * 640)) / 16000
    write_wav(path, 0.3 * np.sin(2 * np.pi * hz * t) * (1 + np.sin(2 * np.pi * 3 * t)), 16000)
    return path


class Clip:
    """A held-out clip's faces and features records, and its generated videos."""

    def __init__(self, tmp: Path, env: StageEnv, truth: np.ndarray, clip_id: str = "c1"):
        self.tmp, self.env, self.clip_id = tmp, env, clip_id
        self.store = ArtifactStore(env.store_uri)
        n, size = len(truth), truth.shape[1]
        fctx = ItemContext(self.store, "faces", clip_id, "f" * 40)
        self.face = FaceTrack(
            clip_id=clip_id, fps=FPS, num_frames=n, crop_size_px=size,
            crops=fctx.commit(_write(tmp / f"{clip_id}-gt.mp4", truth), "crops.mp4", "video"),
            boxes=fctx.commit(_boxes(tmp / f"{clip_id}-b.parquet", n, size), "b.parquet", "t"),
            detector="synthetic", detected_frames=n, tracked_frames=0, lost_frames=0,
            median_face_size_px=float(size), min_face_size_px=float(size), max_faces_in_frame=1,
            max_second_face_ratio=0.0,
        )  # fmt: skip
        xctx = ItemContext(self.store, "features", clip_id, "x" * 40)
        audio = xctx.commit(_wav(tmp / f"{clip_id}.wav", n), "audio.wav", "audio")
        self.feats = ClipFeatures(clip_id=clip_id, fps=FPS, num_frames=n, files=[], audio=audio,
                                  audio_source="original")  # fmt: skip
        self.videos: list[GeneratedVideo] = []

    def add(
        self, frames: np.ndarray, setting: str = "self", checkpoint: str = "main-step7-abc",
        crf: int = 17, num_frames: int | None = None, audio_hz: float = 220.0,
    ) -> None:  # fmt: skip
        i = len(self.videos)
        gctx = ItemContext(self.store, "generate", self.clip_id, "g" * 40)
        video = gctx.commit(_write(self.tmp / f"{self.clip_id}-{i}.mp4", frames, crf),
                            f"v{i}.mp4", "video")  # fmt: skip
        audio = self.feats.audio
        if setting == "cross":
            wav = _wav(self.tmp / f"{self.clip_id}-x{i}.wav", len(frames), audio_hz)
            audio = gctx.commit(wav, f"a{i}.wav", "audio")
        self.videos.append(
            GeneratedVideo(
                family="musetalk15",
                checkpoint=checkpoint,
                checkpoint_sha256="0" * 64,
                generator_origin="trained",
                setting=setting,
                audio_clip_id=self.clip_id if setting == "self" else "other",
                audio=audio,
                video=video,
                num_frames=len(frames) if num_frames is None else num_frames,
            )
        )

    def inputs(self) -> ItemInputs:
        gen = GeneratedClip(clip_id=self.clip_id, fps=FPS, videos=self.videos)
        return ItemInputs(
            item_id=self.clip_id,
            records={"faces": self.face, "features": self.feats, "generate": gen},
        )

    def evaluate(self, stage: EvaluateStage, key: str = "e") -> ClipMetrics:
        ctx = ItemContext(self.store, "evaluate", self.clip_id, key * 40)
        try:
            return stage.process(self.inputs(), ctx)
        finally:
            ctx.close()


def _env(tmp: Path) -> StageEnv:
    return StageEnv(data_root=str(tmp), store_uri=str(tmp / "store"), run_id="t")


def _pixel_stage(tmp: Path) -> EvaluateStage:
    stage = EvaluateStage(EvaluateConfig(chunk_frames=5, metrics=PIXEL), _env(tmp))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every metric's random-init network, loaded once for the module."""
    tmp = tmp_path_factory.mktemp("eval-full")
    stage = EvaluateStage(EvaluateConfig(chunk_frames=8, fid_frame_stride=8), _env(tmp))
    stage.setup()
    return tmp, stage


def test_identical_video_scores_the_caps(tmp_path):
    frames = face_frames(12, 64)
    clip = Clip(tmp_path, _env(tmp_path), frames)
    clip.add(frames)
    rec = clip.evaluate(_pixel_stage(tmp_path))
    row = rec.row("musetalk15", "self")
    assert rec.num_frames == row.num_frames == 12
    assert row.values["ssim"] > 0.98 and row.values["psnr_db"] > 35  # one x264 round trip
    truth = rec.row(GROUND_TRUTH, "self")
    assert truth.values == {"psnr_db": PSNR_CAP_DB, "ssim": 1.0}
    ClipMetrics.model_validate_json(rec.model_dump_json())  # finite, JSON-safe


def test_known_noise_matches_hand_computed_psnr_and_ssim(tmp_path):
    clean = face_frames(10, 64, seed=1)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean.astype(np.float64) + rng.normal(0, 12, clean.shape), 0, 255)
    clip = Clip(tmp_path, _env(tmp_path), clean)
    clip.add(noisy.astype(np.uint8), crf=0)
    row = clip.evaluate(_pixel_stage(tmp_path)).row("musetalk15", "self")
    gt = _decode(clip.store.local_path(clip.face.crops.uri, tmp_path), 64).astype(np.float64)
    gen = _decode(clip.store.local_path(clip.videos[0].video.uri, tmp_path), 64)
    mse = ((gen.astype(np.float64) - gt) ** 2).reshape(10, -1).mean(axis=1)
    by_hand = float(np.mean(10 * np.log10(255.0**2 / mse)))
    ssim_hand = np.mean(
        [
            structural_similarity(x, y, channel_axis=2, data_range=255)
            for x, y in zip(gen, gt.astype(np.uint8), strict=True)
        ]
    )
    assert row.values["psnr_db"] == pytest.approx(by_hand, abs=1e-6)
    assert row.values["ssim"] == pytest.approx(ssim_hand, abs=1e-9)
    assert 22.0 < row.values["psnr_db"] < 31.0 and 0.0 < row.values["ssim"] < 0.9


def test_psnr_formula():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr_db(a, a) == PSNR_CAP_DB


def test_frame_count_tolerance_and_misalignment(tmp_path):
    frames = face_frames(14, 64)
    clip = Clip(tmp_path, _env(tmp_path), frames[:10])
    clip.add(frames[:11])  # one extra frame: tolerated, compared over the ground truth's 10
    assert clip.evaluate(_pixel_stage(tmp_path)).row("musetalk15", "self").num_frames == 10
    clip.videos = []
    clip.add(frames)  # four extra frames
    with pytest.raises(ItemFailure) as exc:
        clip.evaluate(_pixel_stage(tmp_path), key="m")
    assert exc.value.kind == FailureKind.MISALIGNED
    clip.videos = []
    clip.add(frames[:8], num_frames=10)  # the mp4 lost frames the record promises
    with pytest.raises(ItemFailure) as exc:
        clip.evaluate(_pixel_stage(tmp_path), key="n")
    assert exc.value.kind == FailureKind.MISALIGNED


def test_generated_at_another_size_is_compared_at_ground_truth_size(tmp_path):
    big = face_frames(8, 96, seed=2)
    clip = Clip(tmp_path, _env(tmp_path), big)
    clip.add(np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in big]))
    row = clip.evaluate(_pixel_stage(tmp_path)).row("musetalk15", "self")
    assert 20.0 < row.values["psnr_db"] < PSNR_CAP_DB and row.values["ssim"] > 0.5


def test_arcface_maps_put_the_landmarks_on_the_template(tmp_path):
    rng = np.random.default_rng(0)
    n, size = 6, 200
    # landmarks in source pixels; the crop is the source shifted by (−20, −10), scaled 0.8
    template = ARCFACE_TEMPLATE_112 * 1.3 + 30 + rng.normal(0, 0.5, (n, 5, 2))
    lm = template.reshape(n, 10)
    lm[2] = np.nan  # a frame without detection: interpolated
    path = _boxes(tmp_path / "b.parquet", n, size, lm)
    boxes = {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
    boxes["m00"], boxes["m11"] = np.full(n, 0.8), np.full(n, 0.8)
    boxes["m02"], boxes["m12"] = np.full(n, -16.0), np.full(n, -8.0)
    maps = arcface_affines(boxes)
    assert maps is not None and maps.shape == (n, 2, 3)
    for i in (0, 3):
        crop = template[i] * 0.8 + [-16.0, -8.0]
        mapped = crop @ maps[i, :, :2].T + maps[i, :, 2]
        assert np.abs(mapped - ARCFACE_TEMPLATE_112).max() < 2.0  # noise only
    assert np.isfinite(maps).all()
    del boxes["lm_x0"]
    assert arcface_affines(boxes) is None and ARCFACE_PX == 112


@pytest.mark.slow  # full-size random-init Inception, I3D, VGG on CPU
def test_every_metric_both_settings_the_ground_truth_row_and_caching(full, monkeypatch):
    tmp, stage = full
    frames = face_frames(40, 64, seed=3)
    rng = np.random.default_rng(1)
    noisy = np.clip(frames + rng.normal(0, 10, frames.shape), 0, 255).astype(np.uint8)
    clip = Clip(tmp, stage.env, frames)
    clip.add(noisy)
    clip.add(noisy[:36], setting="cross", audio_hz=330.0)
    assert {s.family for s in stage.model_specs()} == {
        m.network for m in METRICS.values() if m.network
    }
    rec = clip.evaluate(stage)
    assert set(rec.model_origins.values()) == {"random-init"}
    assert {(r.family, r.setting) for r in rec.rows} == {
        (f, s) for f in ("musetalk15", GROUND_TRUTH) for s in ("self", "cross")
    }
    for setting in (Setting.SELF, Setting.CROSS):
        want = {m for m in CLIP_METRICS if setting in METRICS[m].settings}
        gen, truth = rec.row("musetalk15", setting), rec.row(GROUND_TRUTH, setting)
        assert want <= set(gen.values) and want <= set(truth.values), setting
        assert {k.split("_at_")[0] for k in gen.values} <= want
        assert gen.features is not None and truth.features is not None
    assert "psnr_db" not in rec.row("musetalk15", "cross").values
    ref = rec.row(GROUND_TRUTH, "self").values
    assert ref["psnr_db"] == PSNR_CAP_DB and ref["ssim"] == pytest.approx(1.0)
    assert ref["lpips_alex"] == pytest.approx(0.0, abs=1e-6) and ref["apd_deg"] == 0.0
    assert ref["csim"] == pytest.approx(1.0)
    gen = rec.row("musetalk15", "self").values
    assert gen["psnr_db"] < PSNR_CAP_DB and gen["lpips_vgg"] > 0 and gen["csim"] < 1.0
    assert "acd_at_32" in gen and rec.row("musetalk15", "cross").num_frames == 36
    rows = rec.stats_rows()["eval_metrics"]
    assert {r["row"] for r in rows} == {"generated", GROUND_TRUTH}
    assert {r["model_origin"] for r in rows} == {"random-init"}
    assert {r["audio_clip_id"] for r in rows if r["setting"] == "cross"} == {"other", "c1"}

    # the same videos under another item key: every row from the store, nothing decoded
    monkeypatch.setattr(stage.suite, "describe", lambda *a, **k: pytest.fail("recomputed"))
    again = clip.evaluate(stage, key="r")
    assert again.rows == rec.rows
    monkeypatch.undo()

    # a second clip, then the set: FID / FVD per family, checkpoint, setting
    other = Clip(tmp, stage.env, face_frames(40, 64, seed=4), clip_id="c2")
    other_frames = face_frames(40, 64, seed=5)
    other.add(other_frames)
    other.add(other_frames[:30], setting="cross")
    recs = [rec, other.evaluate(stage)]
    agg = EvaluateSetStage(EvaluateSetConfig(), stage.env)
    actx = ItemContext(clip.store, "evaluate_set", "evaluate_set", "s" * 40)
    try:
        items = [ItemInputs(item_id=r.clip_id, records={"evaluate": r}) for r in recs]
        out = agg.process(AggregateInputs(item_id="evaluate_set", items=items), actx)
    finally:
        actx.close()
    assert isinstance(out, EvalSetMetrics) and out.num_heldout_clips == 2
    table = {(r.family, r.setting, r.metric): r for r in out.summary}
    assert table[(GROUND_TRUTH, "self", "fid")].value == pytest.approx(0.0, abs=1e-6)
    assert table[(GROUND_TRUTH, "cross", "fid")].value == pytest.approx(0.0, abs=1e-6)
    assert table[("musetalk15", "self", "fid")].value > 0
    assert table[("musetalk15", "cross", "fid")].value > 0
    assert table[("musetalk15", "self", "fvd")].value > 0
    assert table[(GROUND_TRUTH, "self", "fvd")].value == pytest.approx(0.0, abs=1e-6)
    assert (GROUND_TRUTH, "cross", "fvd") not in table  # FVD is a self-reconstruction metric
    psnr = table[("musetalk15", "self", "psnr_db")]
    assert psnr.num_clips == 2 and psnr.level == "clip" and psnr.higher_is_better
    assert table[(GROUND_TRUTH, "self", "psnr_db")].value == PSNR_CAP_DB
    assert table[(GROUND_TRUTH, "self", "csim")].value == pytest.approx(1.0)
    assert ("musetalk15", "cross", "psnr_db") not in table
    assert all(r.model_origin == "random-init" for r in out.summary)
    rows = out.stats_rows()["eval_summary"]
    assert len(rows) == len(out.summary) and all("split_rule" in r for r in rows)
