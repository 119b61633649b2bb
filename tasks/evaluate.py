"""Evaluate stage: every clip-level metric of every generated video of a held-out clip, and
the ground-truth row.

Per held-out clip the ground-truth face crops and each generated video (one per checkpoint
and setting, :mod:`tasks.generate`) are decoded **once** (whole, generated frames resized to
the ground truth's size with area / cubic interpolation) and every metric of :mod:`metrics`
reads those arrays: PSNR / SSIM / LPIPS (paired), CSIM / ACD (ArcFace on 112 px faces aligned
with the faces stage's landmarks), APD (LivePortrait pose), Sync-C / Sync-D / AV offset
(SyncNet against the audio that drove the video — the clip's own wav in ``self``, the
partner's in ``cross`` — with the faces stage's crop geometry), and the Inception / I3D
features that ``evaluate_set`` turns into FID / FVD. The ground truth against itself (with
its own audio) is the reference row, family ``ground_truth``. Rows keep the metrics that mean
something in their setting (:mod:`metrics.registry`). Results carry the fingerprint origin
of every metric network (``random-init`` stand-ins on the embedded default).

**Caching per video.** A new checkpoint re-plans every clip (its generate record changed),
so each video's numbers are committed under their own key — the code version, the evaluate
config, the metric networks' weights hashes and the hashes of the video, its audio and the
ground-truth crops and boxes — and reused when already in the store. A clip whose every row
is cached decodes nothing.

A generated video may differ from its recorded frame count, or run past the ground truth,
by ``max_frame_mismatch`` frames (an encoder's last frame); more is ``MISALIGNED``. Memory:
a clip is held as whole uint8 arrays (FVD windows, ACD curves and paired metrics all need
random access), about 200 kB per 256 px frame.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np
from safetensors.numpy import save_file

from metrics.registry import Setting, for_setting
from models.registry import ModelUnavailableError, ensure_model, fingerprint
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Stage,
    StageConfig,
    stable_hash,
)
from tasks.evaluate_config import EvaluateConfig
from tasks.faces_align import aligned_affines
from tasks.media import iter_frames, probe, read_wav
from tasks.quality_measures import AFFINE_COLUMNS, LANDMARK_COLUMNS, landmarks, read_boxes
from tasks.quality_sync import syncnet_crop_affines
from tasks.records import ClipFeatures, ClipMetrics, FaceTrack, GeneratedClip, MetricRow
from tasks.records_eval import GROUND_TRUTH, GeneratedVideo

if TYPE_CHECKING:
    from metrics.suite import Geometry, MetricSuite, Side

ARCFACE_PX = 112


def decode(path: Path, chunk: int) -> np.ndarray:
    """A whole video as ``(N, H, W, 3)`` uint8 RGB."""
    info = probe(path)
    with contextlib.closing(iter_frames(path, info.width, info.height, chunk=chunk)) as it:
        blocks = list(it)
    return np.concatenate(blocks) if blocks else np.zeros((0, info.height, info.width, 3), np.uint8)


def to_size(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width) or not len(frames):
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > height else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


def arcface_affines(boxes: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per-frame crop→112 px ArcFace maps from the faces stage's landmarks (None: none)."""
    if any(c not in boxes for c in LANDMARK_COLUMNS):
        return None
    m = np.stack([boxes[c].astype(np.float64) for c in AFFINE_COLUMNS], 1).reshape(-1, 2, 3)
    lm = landmarks(boxes).reshape(-1, 5, 2)
    in_crop = np.einsum("nij,nkj->nki", m[:, :, :2], lm) + m[:, None, :, 2]
    try:
        return aligned_affines(in_crop.reshape(-1, 10), ARCFACE_PX, 0.0, "none", 1)
    except ValueError:  # no frame has landmarks
        return None


class EvaluateStage(Stage[EvaluateConfig]):
    """Per held-out clip: a metric row per generated video, and the ground-truth row."""

    name: ClassVar[str] = "evaluate"
    code_version: ClassVar[str] = "3"  # 3: every video of a clip (checkpoints, settings)
    requires: ClassVar[tuple[str, ...]] = ("faces", "features", "generate")
    config_type: ClassVar[type[StageConfig]] = EvaluateConfig

    suite: MetricSuite | None = None
    origins: dict[str, str] = {}  # noqa: RUF012  (set per instance in setup)
    weights: dict[str, str] = {}  # noqa: RUF012  network family -> weights sha256

    def model_specs(self) -> list[Any]:
        return list(self.config.network_specs().values())

    def setup(self) -> None:
        import torch

        from metrics.suite import MetricSuite

        root = Path(self.env.data_root)
        paths: dict[str, Path] = {}
        origins: dict[str, str] = {}
        weights: dict[str, str] = {}
        for family, spec in self.config.network_specs().items():
            path = ensure_model(spec, root)
            if path is None:
                raise ModelUnavailableError(f"{family}: metric networks load from a local path")
            paths[family] = path
            fp = fingerprint(spec, root)
            origins[family], weights[family] = fp.origin, fp.sha256
        res = self.config.resources
        device = "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.suite = MetricSuite(
            self.config.metrics, paths, face_margin=self.config.face_margin,
            fid_frame_stride=self.config.fid_frame_stride, device=device,
            batch_size=res.batch_size,
        )  # fmt: skip
        self.origins, self.weights = origins, weights

    def teardown(self) -> None:
        self.suite = None

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> ClipMetrics:
        if self.suite is None:
            self.setup()
        gen = inputs.get("generate", GeneratedClip)
        face = inputs.get("faces", FaceTrack)
        feats = inputs.get("features", ClipFeatures)
        base = {
            "code": self.code_version,
            "params": self.config.params_hash(),
            "networks": self.weights,
            "truth": [face.crops.sha256, face.boxes.sha256],
        }
        gt_key = stable_hash({**base, "audio": feats.audio.sha256})
        keys = [
            stable_hash({**base, "video": v.video.sha256, "audio": v.audio.sha256})
            for v in gen.videos
        ]
        cached = {k: self._cached(ctx, gen.clip_id, k) for k in [gt_key, *keys]}
        if any(c is None for c in cached.values()):
            cached.update(self._compute(ctx, gen, face, feats, gt_key, keys, cached))
        reference = cached[gt_key]
        assert reference is not None
        rows: list[MetricRow] = []
        for setting in sorted({v.setting for v in gen.videos}):
            rows.append(
                reference.model_copy(
                    update={"setting": setting, "values": for_setting(reference.values, setting)}
                )
            )
        for video, key in zip(gen.videos, keys, strict=True):
            row = cached[key]
            assert row is not None
            rows.append(row.model_copy(update={"values": for_setting(row.values, video.setting)}))
        return ClipMetrics(
            clip_id=gen.clip_id,
            num_frames=reference.num_frames,
            rows=rows,
            model_origins=dict(self.origins),
            notes=list(gen.notes),
        )

    # ------------------------------------------------------------------ computing rows

    def _compute(
        self,
        ctx: ItemContext,
        gen: GeneratedClip,
        face: FaceTrack,
        feats: ClipFeatures,
        gt_key: str,
        keys: list[str],
        cached: dict[str, MetricRow | None],
    ) -> dict[str, MetricRow]:
        """Decode the ground truth once and each uncached video once; commit their rows."""
        from metrics.suite import Geometry

        assert self.suite is not None
        cfg = self.config
        truth = decode(ctx.local_path(face.crops), cfg.chunk_frames)
        if not len(truth):
            raise ItemFailure(FailureKind.FORMAT, f"{gen.clip_id}: no ground-truth frames")
        boxes = read_boxes(ctx.local_path(face.boxes))
        geometry = Geometry(syncnet_crop_affines(boxes), arcface_affines(boxes)).head(len(truth))
        samples, rate_hz = read_wav(ctx.local_path(feats.audio))
        gt_side = self.suite.describe(truth, samples, rate_hz, gen.fps, geometry)
        out: dict[str, MetricRow] = {}
        if cached[gt_key] is None:
            gt_row = MetricRow(
                family=GROUND_TRUTH, checkpoint="", setting="self", generator_origin=GROUND_TRUTH,
                audio_clip_id=gen.clip_id, num_frames=len(truth),
                values=self.suite.compare(gt_side, gt_side),
            )  # fmt: skip
            out[gt_key] = self._commit(ctx, gen.clip_id, gt_key, gt_row, gt_side)
        for video, key in zip(gen.videos, keys, strict=True):
            if cached[key] is not None:
                continue
            side = self._describe_video(ctx, video, truth, geometry, gen)
            row = MetricRow(
                family=video.family, checkpoint=video.checkpoint, setting=video.setting,
                generator_origin=video.generator_origin, audio_clip_id=video.audio_clip_id,
                num_frames=len(side.frames),
                values=self.suite.compare(side, gt_side, frozenset({Setting(video.setting)})),
            )  # fmt: skip
            out[key] = self._commit(ctx, gen.clip_id, key, row, side)
        return out

    def _describe_video(
        self,
        ctx: ItemContext,
        video: GeneratedVideo,
        truth: np.ndarray,
        geometry: Geometry,
        gen: GeneratedClip,
    ) -> Side:
        assert self.suite is not None
        tolerance = self.config.max_frame_mismatch
        frames = decode(ctx.local_path(video.video), self.config.chunk_frames)
        what = f"{gen.clip_id} {video.checkpoint}/{video.setting}"
        if abs(len(frames) - video.num_frames) > tolerance or len(frames) > len(truth) + tolerance:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"{what}: decoded {len(frames)} frames, recorded {video.num_frames}, "
                f"ground truth {len(truth)}",
            )
        n = min(len(frames), len(truth))
        if n == 0:
            raise ItemFailure(FailureKind.FORMAT, f"{what}: no frames to compare")
        frames = to_size(frames[:n], truth.shape[1], truth.shape[2])
        samples, rate_hz = read_wav(ctx.local_path(video.audio))
        settings = frozenset({Setting(video.setting)})  # e.g. no I3D for a cross-audio video
        return self.suite.describe(frames, samples, rate_hz, gen.fps, geometry.head(n), settings)

    @staticmethod
    def _cached(ctx: ItemContext, clip_id: str, key: str) -> MetricRow | None:
        ref = ctx.store.describe(ctx.stage, clip_id, key, "row.json", "table")
        if ref is None:
            return None
        ctx.record_existing(ref)
        row = MetricRow.model_validate_json(ctx.store.local_path(ref.uri, ctx.scratch).read_text())
        if row.features is not None:
            ctx.record_existing(row.features)
        return row

    @staticmethod
    def _commit(ctx: ItemContext, clip_id: str, key: str, row: MetricRow, side: Side) -> MetricRow:
        """Commit the row's set-level features, then the row itself (its presence marks the
        cache entry complete)."""
        arrays = {k: v.astype(np.float32) for k, v in side.set_features().items()}
        if arrays:
            path = ctx.scratch / f"{key[:16]}-features.safetensors"
            save_file(arrays, str(path))
            owner = (clip_id, key)
            features = ctx.commit(path, "set_features.safetensors", "features", owner=owner)
            row = row.model_copy(update={"features": features})
        path = ctx.scratch / f"{key[:16]}-row.json"
        path.write_text(row.model_dump_json())
        ctx.commit(path, "row.json", "table", owner=(clip_id, key))
        return row
