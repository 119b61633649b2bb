"""Faces stage: detect, track and crop the main face of a normalized clip.

Input: the download stage's :class:`NormalizedClip`. Output: :class:`FaceTrack` with

- ``crops.mp4``: square ``crop_size_px`` face crops, one per source frame, same fps, no audio;
- ``boxes.parquet``: one row per frame (columns in :data:`BOXES_SCHEMA`).

The clip is decoded once, as a stream (never whole in memory), by :mod:`tasks.faces_stream`:
every frame is scored for shot changes (:mod:`tasks.faces_shots`); the detector runs on every
``detect_every_k``-th frame and on the last frame, batched (up to ``resources.batch_size``
keyframes per call), at the configured size on the first keyframe, after a cut and after a
miss, and otherwise at a size adapted to the tracked face (:mod:`tasks.faces_keyframes`);
the main face is tracked over those keyframes, restarting after each cut, and boxes for the
other frames are interpolated and smoothed (:mod:`tasks.faces_track`), or, with
``align: landmarks``, crops follow a smoothed similarity transform of the landmarks onto a
5-point template (:mod:`tasks.faces_align`). Frames wait in a bounded look-ahead buffer until
their crop is final, then are cropped and encoded. Decoding (ffmpeg, read by a background
thread), the Python work and encoding (ffmpeg, fed by another thread) overlap. Shot changes
are recorded per frame in ``boxes.parquet`` for the quality stage to reject.

Failures: no confident face on any detection frame → ``NO_FACE``; the main face missing
for more than ``max_gap_frames`` consecutive frames → ``FACE_LOST``. Shorter gaps are
interpolated and counted in ``lost_frames`` for the quality stage.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.face_detection import detector_model_spec
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs, Stage
from tasks.faces_config import FacesConfig
from tasks.faces_keyframes import KeyframeDetector
from tasks.faces_stream import FaceStream, StreamResult
from tasks.faces_track import SOURCE_DETECTED, SOURCE_INTERPOLATED, SOURCE_TRACKED
from tasks.media import ReadAhead, VideoWriter, iter_frames
from tasks.records import FaceTrack, NormalizedClip

if TYPE_CHECKING:
    from models.face_detector import FaceDetector

# Frames waiting in the look-ahead keep their whole decoded chunk alive, so smaller chunks
# lower peak memory (bench_faces' 2000-frame clip: 1160 MiB at 32 frames, 1056 at 16) at
# the same throughput.
DECODE_CHUNK_FRAMES = 16
READ_AHEAD_CHUNKS = 2  # decoded chunks the reader thread may hold before the stream takes them
ENCODE_QUEUE = 4  # crop batches queued for the encoder's feeding thread

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


class FacesStage(Stage[FacesConfig]):
    """Detect/track/crop the main face; writes crops.mp4 and boxes.parquet."""

    name = "faces"
    # 2: one pass, adaptive keyframe detection, strided shot scores; 3: RetinaFace gets its
    # weights' own preprocessing and keeps boxes that cross the frame edge unclipped
    code_version = "3"
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
        from models.face_detector import load_detector

        cfg = self.config
        device = "cuda" if cfg.resources.num_gpus > 0 else "cpu"
        self.detector = load_detector(
            cfg.detector,
            self._weights_path(),
            device,
            max_side_px=cfg.detect_max_side_px,
            min_face_size_px=cfg.detect_min_face_px,
            num_threads=max(1, int(cfg.resources.num_cpus)),
            retinaface_flavour=cfg.retinaface_flavour,
        )
        fp = self.env.model_fingerprints.get(cfg.detector) or self.detector.fingerprint()
        self.detector_label = f"{cfg.detector}@{fp.sha256[:12]}"

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> FaceTrack:
        if self.detector is None:
            self.setup()
        assert self.detector is not None
        cfg = self.config
        clip = inputs.get("download", NormalizedClip)
        video = ctx.local_path(clip.video)
        keyframes = KeyframeDetector(
            self.detector,
            clip.width,
            clip.height,
            max_side_px=cfg.detect_max_side_px,
            min_face_px=cfg.detect_min_face_px,
            adaptive=cfg.adaptive_detection,
            adaptive_face_px=cfg.adaptive_face_px,
            adaptive_min_face_ratio=cfg.adaptive_min_face_ratio,
        )
        crops_path = ctx.scratch / "crops.mp4"
        px = cfg.crop_size_px
        with (
            ReadAhead(
                iter_frames(video, clip.width, clip.height, chunk=DECODE_CHUNK_FRAMES),
                READ_AHEAD_CHUNKS,
            ) as chunks,
            ExitStack() as encoder,
        ):

            def open_writer() -> VideoWriter:  # at the first crops, after the decoder started
                writer = VideoWriter(
                    crops_path,
                    px,
                    px,
                    clip.fps,
                    preset=cfg.encode_preset,
                    write_behind=ENCODE_QUEUE,
                )
                return encoder.enter_context(writer)

            stream = FaceStream(cfg, keyframes, open_writer)
            for chunk in chunks:
                stream.feed(chunk)
            if stream.decoded == 0:
                raise ItemFailure(FailureKind.FORMAT, f"{clip.clip_id}: no frames decoded")
            result = stream.finish()
        boxes_path = ctx.scratch / "boxes.parquet"
        write_boxes(boxes_path, result)

        track = result.track
        detected = track.source == SOURCE_DETECTED
        sizes = np.maximum(
            track.boxes[detected, 2] - track.boxes[detected, 0],
            track.boxes[detected, 3] - track.boxes[detected, 1],
        )
        ratios = track.second_face_ratio[detected]
        return FaceTrack(
            clip_id=clip.clip_id,
            fps=clip.fps,
            num_frames=track.num_frames,
            crop_size_px=px,
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


def write_boxes(path: Path, result: StreamResult) -> None:
    """Write the per-frame table (:data:`BOXES_SCHEMA`)."""
    track = result.track
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
        "crop_x": result.crop_x.astype(np.int32),
        "crop_y": result.crop_y.astype(np.int32),
        "crop_size": result.crop_size.astype(np.int32),
        **{c: result.affines[:, i // 3, i % 3] for i, c in enumerate(AFFINE_COLUMNS)},
        "content_score": result.content_score.astype(np.float32),
        "shot_change": result.shot_change,
    }
    table = pa.table(cols, schema=BOXES_SCHEMA)
    pq.write_table(table, path)
