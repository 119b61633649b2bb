"""Evaluate stage: every clip-level metric of a generated clip, and its ground-truth row.

Per held-out clip, the generated video and the ground-truth face crops are each decoded
**once** (whole, at the ground truth's size: generated frames are resized with area / cubic
interpolation when sizes differ) and every metric of :mod:`metrics` reads those arrays:
PSNR / SSIM / LPIPS (paired), CSIM / ACD (ArcFace), APD (LivePortrait pose), Sync-C / Sync-D /
AV offset (SyncNet, against the clip's audio ``ClipFeatures.audio`` with the faces stage's
crop geometry), and the Inception / I3D features that the ``evaluate_set`` stage turns into
FID / FVD. The same metrics of the ground truth against itself form the reference row (as in
MuseTalk's table). Results are labelled with the model family and checkpoint that made the
clip and the setting (``self``: the clip's own audio, what the generate stage produces), and
the fingerprint origin of every metric network (``random-init`` stand-ins on the embedded
default).

The two streams may differ by ``max_frame_mismatch`` frames (an encoder's last frame); more
is ``MISALIGNED``. Extra frames are ignored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors.numpy import save_file

from metrics.registry import METRICS, Level, Setting
from metrics.suite import MetricSuite, Side
from models.registry import ModelSpec, ModelUnavailableError, ensure_model, fingerprint
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs, Stage, StageConfig
from tasks.media import iter_frames, probe, read_wav
from tasks.quality_measures import read_boxes
from tasks.quality_sync import syncnet_crop_affines
from tasks.records import ClipFeatures, ClipMetrics, FaceTrack, GeneratedClip, TrainedCheckpoint

CLIP_METRICS = [m.name for m in METRICS.values() if m.level == Level.CLIP]


def _tiny(family: str) -> ModelSpec:
    return ModelSpec(family=family, source=f"models/{family}-tiny", tiny_random=True)


class EvaluateConfig(StageConfig):
    max_frame_mismatch: int = Field(1, ge=0, description="allowed frame-count difference")
    chunk_frames: int = Field(16, ge=1, description="frames decoded per read")
    metrics: list[str] = Field(
        default_factory=lambda: list(METRICS), description="metrics to compute (registry names)"
    )
    face_margin: float = Field(
        0.5, ge=0.0, description="faces.margin: the ArcFace square is crop / (1 + margin)"
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


def _decode(path: Path, chunk: int) -> np.ndarray:
    info = probe(path)
    with contextlib.closing(iter_frames(path, info.width, info.height, chunk=chunk)) as it:
        blocks = list(it)
    return np.concatenate(blocks) if blocks else np.zeros((0, info.height, info.width, 3), np.uint8)


def _to_size(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > height else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


def _checkpoint_label(ckpt: TrainedCheckpoint) -> str:
    return f"step{ckpt.steps}-{ckpt.checkpoint.sha256[:12]}"


class EvaluateStage(Stage[EvaluateConfig]):
    """Per generated clip: clip-level metrics, the ground-truth row, set-level features."""

    name: ClassVar[str] = "evaluate"
    code_version: ClassVar[str] = "2"  # 2: the metrics package (all metrics, GT row)
    requires: ClassVar[tuple[str, ...]] = ("faces", "features", "train", "generate")
    config_type: ClassVar[type[StageConfig]] = EvaluateConfig

    suite: MetricSuite | None = None
    origins: dict[str, str] = {}  # noqa: RUF012  (set per instance in setup)

    def model_specs(self) -> list[Any]:
        return list(self.config.network_specs().values())

    def setup(self) -> None:
        root = Path(self.env.data_root)
        paths: dict[str, Path] = {}
        origins: dict[str, str] = {}
        for family, spec in self.config.network_specs().items():
            path = ensure_model(spec, root)
            if path is None:
                raise ModelUnavailableError(f"{family}: metric networks load from a local path")
            paths[family] = path
            origins[family] = fingerprint(spec, root).origin
        res = self.config.resources
        device = "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.suite = MetricSuite(
            self.config.metrics, paths, face_margin=self.config.face_margin,
            fid_frame_stride=self.config.fid_frame_stride, device=device,
            batch_size=res.batch_size,
        )  # fmt: skip
        self.origins = origins

    def teardown(self) -> None:
        self.suite = None

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> ClipMetrics:
        if self.suite is None:
            self.setup()
        assert self.suite is not None
        cfg = self.config
        gen = inputs.get("generate", GeneratedClip)
        face = inputs.get("faces", FaceTrack)
        feats = inputs.get("features", ClipFeatures)
        ckpt = inputs.get("train", TrainedCheckpoint)
        generated = _decode(ctx.local_path(gen.video), cfg.chunk_frames)
        truth = _decode(ctx.local_path(face.crops), cfg.chunk_frames)
        if abs(len(generated) - len(truth)) > cfg.max_frame_mismatch:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"{gen.clip_id}: generated {len(generated)} frames, ground truth {len(truth)}",
            )
        n = min(len(generated), len(truth))
        if n == 0:
            raise ItemFailure(FailureKind.FORMAT, f"{gen.clip_id}: no frames to compare")
        truth = truth[:n]
        generated = _to_size(generated[:n], truth.shape[1], truth.shape[2])
        samples, rate_hz = read_wav(ctx.local_path(feats.audio))
        affines = syncnet_crop_affines(read_boxes(ctx.local_path(face.boxes)))[:n]

        gt_side = self.suite.describe(truth, samples, rate_hz, gen.fps, affines)
        gen_side = self.suite.describe(generated, samples, rate_hz, gen.fps, affines)
        setting = Setting.SELF
        values = self.suite.compare(gen_side, gt_side, setting)
        reference = self.suite.compare(gt_side, gt_side, setting)
        features = self._commit_features(ctx, gen_side, gt_side)
        return ClipMetrics(
            clip_id=gen.clip_id,
            num_frames=n,
            psnr_db=values.get("psnr_db", float("nan")),
            ssim=values.get("ssim", float("nan")),
            family=ckpt.family,
            checkpoint=_checkpoint_label(ckpt),
            setting=setting.value,
            values=values,
            reference=reference,
            features=features,
            model_origins=dict(self.origins),
        )

    @staticmethod
    def _commit_features(ctx: ItemContext, gen: Side, truth: Side) -> Any:
        arrays: dict[str, np.ndarray] = {}
        for row, side in (("generated", gen), ("ground_truth", truth)):
            if side.inception is not None:
                arrays[f"inception/{row}"] = side.inception.astype(np.float32)
            for key, feats in side.i3d.items():
                arrays[f"i3d_{key}/{row}"] = feats.astype(np.float32)
        if not arrays:
            return None
        path = ctx.scratch / "set_features.safetensors"
        save_file(arrays, str(path))
        return ctx.commit(path, "set_features.safetensors", "features")
