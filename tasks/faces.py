"""Faces stage: detect, track and crop the main face of a normalized clip.

Input: the download stage's :class:`NormalizedClip`. Output: :class:`FaceTrack` with

- ``crops.mp4``: square ``crop_size_px`` face crops, one per source frame, same fps, no audio;
- ``boxes.parquet``: one row per frame (columns in :data:`BOXES_SCHEMA`).

The clip is decoded twice as a stream (never whole in memory): pass 1 runs the detector on
every ``detect_every_k``-th frame and on the last frame, batched
(``resources.batch_size`` frames per call), and scores every frame for shot changes
(:mod:`tasks.faces_shots`); the main face is then tracked over the detection frames,
restarting after each cut, and boxes for the other frames are interpolated and smoothed
(:mod:`tasks.faces_track`), or, with ``align: landmarks``, crops follow a smoothed
similarity transform of the landmarks onto a 5-point template (:mod:`tasks.faces_align`);
pass 2 cuts and encodes the crops. Shot changes are recorded
per frame in ``boxes.parquet`` for the quality stage to reject. Decoding twice costs a
little CPU but keeps memory at one chunk of frames plus the keyframes of one detector
batch, whatever the clip length.

Failures: no confident face on any detection frame → ``NO_FACE``; the main face missing
for more than ``max_gap_frames`` consecutive frames → ``FACE_LOST``. Shorter gaps are
interpolated and counted in ``lost_frames`` for the quality stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from models.face_detector import Detection, FaceDetector, detector_model_spec, load_detector
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Resources,
    Stage,
    StageConfig,
)
from tasks.faces_align import affine_square, aligned_affines, box_affines, warp_crop
from tasks.faces_shots import ContentScorer, detect_cuts
from tasks.faces_track import (
    SOURCE_DETECTED,
    SOURCE_INTERPOLATED,
    SOURCE_TRACKED,
    KeyframeObs,
    MainFaceTracker,
    Track,
    build_track,
    crop_square,
    crop_windows,
    smooth_track,
)
from tasks.media import VideoWriter, iter_frames, probe
from tasks.records import FaceTrack, NormalizedClip

LANDMARK_COLUMNS = [f"lm_{axis}{i}" for i in range(5) for axis in ("x", "y")]
AFFINE_COLUMNS = ["m00", "m01", "m02", "m10", "m11", "m12"]

BOXES_SCHEMA = pa.schema(
    [
        pa.field("frame", pa.int32()),
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
        pa.field("x2", pa.float32()),
        pa.field("y2", pa.float32()),
        pa.field("score", pa.float32()),  # NaN unless source == detected
        pa.field("source", pa.string()),  # detected / tracked / interpolated
        *[pa.field(c, pa.float32()) for c in LANDMARK_COLUMNS],  # NaN unless detected
        pa.field("detector_ran", pa.bool_()),
        pa.field("num_faces", pa.int16()),  # -1 where the detector did not run
        pa.field("second_face_ratio", pa.float32()),  # NaN where not measured
        pa.field("crop_x", pa.int32()),
        pa.field("crop_y", pa.int32()),
        pa.field("crop_size", pa.int32()),  # source pixels, before resizing to crop_size_px
        *[pa.field(c, pa.float64()) for c in AFFINE_COLUMNS],  # source → crop pixels
        pa.field("content_score", pa.float32()),  # HSV change from the previous frame
        pa.field("shot_change", pa.bool_()),  # a new shot starts at this frame
    ]
)


class FacesConfig(StageConfig):
    """Detector choice, tracking, gap tolerance and crop geometry."""

    detector: Literal["mtcnn", "retinaface"] = "mtcnn"
    retinaface_weights: str | None = Field(
        None, description="state dict or hub zip; relative to data_root; None = torch hub cache"
    )
    detect_every_k: int = Field(5, ge=1, description="run the detector on every k-th frame")
    detect_max_side_px: int = Field(480, ge=64, description="frames are detected at this size")
    detect_min_face_px: int = Field(
        40, ge=12, description="smallest face searched (MTCNN), in detection-size pixels"
    )
    min_detection_score: float = Field(0.9, ge=0.0, le=1.0)
    min_track_iou: float = Field(0.3, ge=0.0, le=1.0, description="IoU to continue the track")
    max_gap_frames: int = Field(15, ge=0, description="longer gaps fail with FACE_LOST")
    crop_size_px: int = Field(256, ge=32, le=2048)
    margin: float = Field(0.5, ge=0.0, le=3.0, description="crop side = face side × (1+margin)")
    smoothing: Literal["none", "moving_average"] = "moving_average"
    smoothing_window_frames: int = Field(9, ge=1, description="odd; centred window")
    pad_mode: Literal["constant", "edge"] = "constant"  # black or edge pixels outside frame
    align: Literal["box", "landmarks"] = Field(
        "box", description="square box crops, or similarity-aligned to a 5-point template"
    )
    shot_min_content: float = Field(15.0, ge=0.0, description="min HSV change for a cut")
    shot_adaptive_ratio: float = Field(
        3.0, ge=1.0, description="a cut's change vs its neighbours' (see faces_shots)"
    )
    resources: Resources = Resources(batch_size=16)

    @field_validator("crop_size_px")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("crop_size_px must be even (yuv420p)")
        return v

    @field_validator("smoothing_window_frames")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("smoothing_window_frames must be odd (centred window)")
        return v


class FacesStage(Stage[FacesConfig]):
    """Detect/track/crop the main face; writes crops.mp4 and boxes.parquet."""

    name = "faces"
    code_version = "1"
    requires = ("download",)
    config_type = FacesConfig

    detector: FaceDetector | None = None
    detector_label: str = ""

    def _weights_path(self) -> str | None:
        w = self.config.retinaface_weights
        if w is None:
            return None
        p = Path(w).expanduser()
        return str(p if p.is_absolute() else Path(self.env.data_root) / p)

    def model_specs(self) -> list[Any]:
        return [detector_model_spec(self.config.detector, self._weights_path())]

    def setup(self) -> None:
        cfg = self.config
        device = "cuda" if cfg.resources.num_gpus > 0 else "cpu"
        self.detector = load_detector(
            cfg.detector,
            self._weights_path(),
            device,
            max_side_px=cfg.detect_max_side_px,
            min_face_size_px=cfg.detect_min_face_px,
            num_threads=max(1, int(cfg.resources.num_cpus)),
        )
        fp = self.env.model_fingerprints.get(cfg.detector) or self.detector.fingerprint()
        self.detector_label = f"{cfg.detector}@{fp.sha256[:12]}"

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> FaceTrack:
        if self.detector is None:
            self.setup()
        clip = inputs.get("download", NormalizedClip)
        video = ctx.local_path(clip.video)
        info = probe(video)
        num_frames, detections, scores = self._detect_pass(video, info.width, info.height)
        if num_frames == 0:
            raise ItemFailure(FailureKind.FORMAT, f"{clip.clip_id}: no frames decoded")
        cuts = detect_cuts(scores, self.config.shot_min_content, self.config.shot_adaptive_ratio)
        observations = self._track(detections, cuts)
        track = build_track(num_frames, observations, self.config.max_gap_frames)
        affines, (crop_x, crop_y, crop_size) = self._geometry(track)

        crops_path = ctx.scratch / "crops.mp4"
        written = self._crop_pass(
            video, info.width, info.height, clip.fps, crops_path, affines, crop_x, crop_y, crop_size
        )
        if written != num_frames:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"{clip.clip_id}: decoded {written} frames on the second pass, {num_frames} first",
            )
        boxes_path = ctx.scratch / "boxes.parquet"
        shot_change = np.zeros(num_frames, dtype=bool)
        shot_change[cuts] = True
        write_boxes(
            boxes_path, track, affines, crop_x, crop_y, crop_size, np.asarray(scores), shot_change
        )

        detected = track.source == SOURCE_DETECTED
        sizes = np.maximum(
            track.boxes[detected, 2] - track.boxes[detected, 0],
            track.boxes[detected, 3] - track.boxes[detected, 1],
        )
        ratios = track.second_face_ratio[detected]
        return FaceTrack(
            clip_id=clip.clip_id,
            fps=clip.fps,
            num_frames=num_frames,
            crop_size_px=self.config.crop_size_px,
            crops=ctx.commit(crops_path, "crops.mp4", "video"),
            boxes=ctx.commit(boxes_path, "boxes.parquet", "table"),
            detector=self.detector_label,
            detected_frames=int(detected.sum()),
            tracked_frames=track.count(SOURCE_TRACKED),
            lost_frames=track.count(SOURCE_INTERPOLATED),
            median_face_size_px=float(np.median(sizes)),
            min_face_size_px=float(sizes.min()),
            max_faces_in_frame=int(track.num_faces.max()),
            max_second_face_ratio=float(np.nanmax(ratios)) if ratios.size else 0.0,
        )

    def _geometry(
        self, track: Track
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per-frame source→crop affines and the source squares they cover."""
        cfg = self.config
        px = cfg.crop_size_px
        if cfg.align == "landmarks":
            if np.isnan(track.landmarks).all():
                raise ItemFailure(
                    FailureKind.MODEL, f"{cfg.detector} gave no landmarks to align on"
                )
            affines = aligned_affines(
                track.landmarks, px, cfg.margin, cfg.smoothing, cfg.smoothing_window_frames
            )
            return affines, affine_square(affines, px)
        cx, cy, side = smooth_track(track.boxes, cfg.smoothing, cfg.smoothing_window_frames)
        crop_x, crop_y, crop_size = crop_windows(cx, cy, side, cfg.margin)
        return box_affines(crop_x, crop_y, crop_size, px), (crop_x, crop_y, crop_size)

    def _detect_pass(
        self, video: Path, width: int, height: int
    ) -> tuple[int, list[tuple[int, list[Detection]]], list[float]]:
        """Detect on every k-th frame and the last one, scoring content changes on all.

        Returns (frames decoded, [(frame, detections)] in frame order, content scores).
        """
        assert self.detector is not None
        detector = self.detector
        k = self.config.detect_every_k
        scorer = ContentScorer()
        found: list[tuple[int, list[Detection]]] = []
        batch: list[np.ndarray] = []
        batch_idx: list[int] = []

        def flush() -> None:
            if batch:
                found.extend(zip(batch_idx, detector.detect(np.stack(batch)), strict=True))
                batch.clear()
                batch_idx.clear()

        n = 0
        last: np.ndarray | None = None
        for chunk in iter_frames(video, width, height):
            scorer.add(chunk)
            for j in range(chunk.shape[0]):
                if (n + j) % k == 0:
                    batch.append(chunk[j].copy())
                    batch_idx.append(n + j)
            n += chunk.shape[0]
            last = chunk[-1].copy()
            if len(batch) >= self.config.resources.batch_size:
                flush()
        if last is not None and (n - 1) % k != 0:
            batch.append(last)
            batch_idx.append(n - 1)
        flush()
        return n, found, scorer.scores

    def _track(
        self, detections: list[tuple[int, list[Detection]]], cuts: np.ndarray
    ) -> list[KeyframeObs]:
        """Main face per detection frame; the track restarts after each shot change."""
        cfg = self.config
        tracker = MainFaceTracker(cfg.min_detection_score, cfg.min_track_iou, cfg.max_gap_frames)
        observations: list[KeyframeObs] = []
        prev = -1
        for frame, dets in detections:
            if np.any((cuts > prev) & (cuts <= frame)):
                tracker.reset()
            observations.append(tracker.update(frame, dets))
            prev = frame
        return observations

    def _crop_pass(
        self,
        video: Path,
        width: int,
        height: int,
        fps: float,
        out: Path,
        affines: np.ndarray,
        crop_x: np.ndarray,
        crop_y: np.ndarray,
        crop_size: np.ndarray,
    ) -> int:
        """Cut and encode one crop per frame; returns the frames decoded."""
        px, pad = self.config.crop_size_px, self.config.pad_mode
        aligned = self.config.align == "landmarks"

        def cut(frame: np.ndarray, i: int) -> np.ndarray:
            if aligned:
                return warp_crop(frame, affines[i], px, pad)
            return crop_square(frame, int(crop_x[i]), int(crop_y[i]), int(crop_size[i]), px, pad)

        n = 0  # frames decoded; only the first len(crop_x) are cropped
        with VideoWriter(out, px, px, fps) as writer:
            for chunk in iter_frames(video, width, height):
                take = min(chunk.shape[0], len(crop_x) - n)
                if take > 0:
                    writer.write(np.stack([cut(chunk[j], n + j) for j in range(take)]))
                n += chunk.shape[0]
        return n


def write_boxes(
    path: Path,
    track: Track,
    affines: np.ndarray,
    crop_x: np.ndarray,
    crop_y: np.ndarray,
    crop_size: np.ndarray,
    content_score: np.ndarray,
    shot_change: np.ndarray,
) -> None:
    """Write the per-frame table (:data:`BOXES_SCHEMA`)."""
    n = track.num_frames
    cols: dict[str, Any] = {
        "frame": np.arange(n, dtype=np.int32),
        "x1": track.boxes[:, 0].astype(np.float32),
        "y1": track.boxes[:, 1].astype(np.float32),
        "x2": track.boxes[:, 2].astype(np.float32),
        "y2": track.boxes[:, 3].astype(np.float32),
        "score": track.score.astype(np.float32),
        "source": track.source.astype(str).tolist(),
        **{c: track.landmarks[:, i].astype(np.float32) for i, c in enumerate(LANDMARK_COLUMNS)},
        "detector_ran": track.detector_ran,
        "num_faces": track.num_faces.astype(np.int16),
        "second_face_ratio": track.second_face_ratio.astype(np.float32),
        "crop_x": crop_x.astype(np.int32),
        "crop_y": crop_y.astype(np.int32),
        "crop_size": crop_size.astype(np.int32),
        **{c: affines[:, i // 3, i % 3] for i, c in enumerate(AFFINE_COLUMNS)},
        "content_score": content_score.astype(np.float32),
        "shot_change": shot_change.astype(bool),
    }
    table = pa.table(cols, schema=BOXES_SCHEMA)
    pq.write_table(table, path)
