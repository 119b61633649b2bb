"""Typed records at every stage boundary, in pipeline order.

Units live in field names (``start_s``, ``fps``, ``size_px``, ``sample_rate_hz``). Records are
stored as JSON in the catalog's ``items`` table and rebuilt with :func:`record_from_json`,
so a downstream stage always gets exactly the type its upstream committed.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from models.fingerprint import ModelFingerprint
from storage.store import ArtifactRef
from tasks.base import Record
from tasks.records_eval import ClipMetrics as ClipMetrics  # evaluation records: re-exported
from tasks.records_eval import EvalSetMetrics as EvalSetMetrics
from tasks.records_eval import EvalSummaryRow as EvalSummaryRow
from tasks.records_eval import GeneratedClip as GeneratedClip
from tasks.records_eval import GeneratedVideo as GeneratedVideo
from tasks.records_eval import MetricRow as MetricRow


class CropBox(Record):
    """A square-or-not crop rectangle in source pixels (HDTF ``crop_wh`` columns x, w, y, h)."""

    x: int
    y: int
    w: int
    h: int
    reference_height: int | None = None  # frame height the box was measured on


class NormalizedBox(Record):
    """A face box in fractions of the frame (CelebV-HQ ``bbox``: top/bottom/left/right)."""

    top: float
    bottom: float
    left: float
    right: float


class EmotionSegment(Record):
    """One emotion over part of a clip; times relative to the clip start (CelebV-HQ)."""

    emotion: str
    start_s: float
    end_s: float


class CelebvAnnotations(Record):
    """CelebV-HQ attributes decoded to names with the file's own ``meta_info`` mappings."""

    appearance: tuple[str, ...] = ()  # names whose flag is 1
    actions: tuple[str, ...] = ()
    emotion: str = ""  # the single label, or "mixed" when the clip has segments
    emotion_segments: tuple[EmotionSegment, ...] = ()
    version: str = ""


class TalkvidAnnotations(Record):
    """TalkVid per-clip person info and the release's quality scores (kept as columns)."""

    person_id: str = ""
    gender: str = ""
    age_group: str = ""
    ethnicity: str = ""
    category: str = ""
    description: str = ""
    dover_score: float | None = None
    cotracker_ratio: float | None = None
    head_detail: dict[str, float] = Field(default_factory=dict)
    declared_duration_s: float | None = None  # the ``durations`` string ("5.042s")


class SourceClip(Record):
    """One clip as described by a dataset's published metadata, before anything is fetched."""

    dataset: str  # "hdtf", "celebvhq", "talkvid", "sample"
    subset: str = ""  # HDTF: RD / WDA / WRA
    source_id: str  # the source video (YouTube id), one download per source
    clip_id: str  # safe, unique across datasets: the catalog item id
    url: str
    start_s: float
    end_s: float
    declared_height: int | None = None
    declared_width: int | None = None
    declared_fps: float | None = None
    crop: CropBox | None = None  # HDTF: pixels at ``crop.reference_height``
    bbox: NormalizedBox | None = None  # CelebV-HQ: fractions, expanded and squared at cut time
    licence: str = ""
    speaker: str = ""
    language: str = ""
    celebvhq: CelebvAnnotations | None = None
    talkvid: TalkvidAnnotations | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class NormalizedClip(Record):
    """A cut, constant-frame-rate clip with its 16 kHz mono audio (download stage output)."""

    clip_id: str
    dataset: str
    source_id: str
    start_s: float
    end_s: float
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    audio_sample_rate_hz: int
    audio_channels: int
    video: ArtifactRef  # mp4 (h264 + aac) at ``fps``
    audio: ArtifactRef  # wav, pcm s16le, mono
    raw: ArtifactRef | None = None  # the source download it was cut from

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "clips": [
                {
                    "dataset": self.dataset,
                    "source_id": self.source_id,
                    "start_s": self.start_s,
                    "end_s": self.end_s,
                    "duration_s": self.duration_s,
                    "fps": self.fps,
                    "num_frames": self.num_frames,
                    "width": self.width,
                    "height": self.height,
                    "audio_sample_rate_hz": self.audio_sample_rate_hz,
                    "audio_channels": self.audio_channels,
                }
            ]
        }


class FaceTrack(Record):
    """The main face of a clip, tracked and cropped (faces stage output).

    ``boxes`` is a parquet table with one row per frame: frame, x1, y1, x2, y2, score,
    source ("detected" / "tracked" / "interpolated"), landmarks (10 floats), num_faces,
    second_face_ratio and the crop transform (crop_x, crop_y, crop_size).
    """

    clip_id: str
    fps: float
    num_frames: int
    crop_size_px: int
    crops: ArtifactRef  # mp4 of square face crops, same frame count and fps as the clip
    boxes: ArtifactRef  # per-frame parquet table
    detector: str
    detected_frames: int
    tracked_frames: int
    lost_frames: int
    median_face_size_px: float
    min_face_size_px: float
    max_faces_in_frame: int
    max_second_face_ratio: float  # size of the 2nd largest face / main face, max over frames

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "faces": [
                {
                    "detector": self.detector,
                    "num_frames": self.num_frames,
                    "detected_frames": self.detected_frames,
                    "tracked_frames": self.tracked_frames,
                    "lost_frames": self.lost_frames,
                    "median_face_size_px": self.median_face_size_px,
                    "min_face_size_px": self.min_face_size_px,
                    "max_faces_in_frame": self.max_faces_in_frame,
                    "max_second_face_ratio": self.max_second_face_ratio,
                    "crop_size_px": self.crop_size_px,
                }
            ]
        }


class RuleResult(Record):
    """One quality rule's measurement and verdict."""

    rule: str
    value: float
    threshold: float
    passed: bool
    hard: bool = True  # hard rules reject; soft rules only lower the sampling weight
    # why it failed, human readable; empty when passed, except for a note on how a passing
    # rule was decided when it could not simply measure (``av_offset``: unmeasurable, re-aligned)
    reason: str = ""
    # False: the rule could not measure and passed by default (reason starts "unmeasured");
    # the quality_rules view counts these apart from measured passes
    measured: bool = True


class QualityVerdict(Record):
    """All rule results for a clip; rejected clips are ``filtered`` with the first reason."""

    clip_id: str
    accepted: bool
    sampling_weight: float = 1.0
    rules: list[RuleResult]
    # ``av_offset`` re-alignment: the clip's audio delayed by ``audio_shift_ms`` (negative:
    # advanced), zero-filled to the same length; stages that read the clip's audio must
    # take ``aligned_audio`` instead of ``NormalizedClip.audio`` when it is set
    audio_shift_ms: float = 0.0
    aligned_audio: ArtifactRef | None = None

    def rejection_reason(self) -> str | None:
        if self.accepted:
            return None
        failed = [r for r in self.rules if r.hard and not r.passed]
        return "; ".join(f"{r.rule}: {r.reason}" for r in failed) or "rejected"

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "quality": [
                {
                    "rule": r.rule,
                    "value": r.value,
                    "threshold": r.threshold,
                    "passed": r.passed,
                    "hard": r.hard,
                    "reason": r.reason,
                    "measured": r.measured,
                    "accepted": self.accepted,
                }
                for r in self.rules
            ]
        }


class FeatureFile(Record):
    """One safetensors feature file of a clip and what made it."""

    family: str  # "vae_latents", "hubert", ...
    artifact: ArtifactRef
    shape: list[int]
    dtype: str
    frame_rate_hz: float
    model: ModelFingerprint


class SpeechTags(Record):
    """What SenseVoice says about a clip's audio (stored as catalog columns)."""

    language: str = ""
    emotion: str = ""
    event: str = ""
    transcript: str = ""
    model_origin: str = ""  # "random-init" tags are noise, never data


class ClipFeatures(Record):
    """Per-frame features of an accepted clip, aligned to its video frames.

    ``audio`` is the one wav of the clip: the audio features were computed from it, and
    every later stage that needs the clip's sound (generate muxes it, evaluate scores sync
    against it) reads this file, never ``NormalizedClip.audio`` directly.
    """

    clip_id: str
    fps: float
    num_frames: int
    files: list[FeatureFile]
    audio: ArtifactRef  # 16 kHz mono wav the audio features were computed from
    audio_source: Literal["original", "aligned"]  # the clip's own, or quality's re-aligned
    speech: SpeechTags | None = None

    def file(self, family: str) -> FeatureFile:
        for f in self.files:
            if f.family == family:
                return f
        raise KeyError(f"clip {self.clip_id!r} has no {family!r} features")

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "features": [
                {
                    "family": f.family,
                    "shape": "x".join(str(d) for d in f.shape),
                    "dtype": f.dtype,
                    "num_frames": self.num_frames,
                    "frame_rate_hz": f.frame_rate_hz,
                    "model_name": f.model.name,
                    "model_source": f.model.source,
                    "model_sha256": f.model.sha256,
                    "model_origin": f.model.origin,
                }
                for f in self.files
            ],
            "speech": [self.speech.model_dump()] if self.speech is not None else [],
        }


class MemoryBank(Record):
    """The Engram viseme memory bank built from training clips' features."""

    bank: ArtifactRef  # safetensors: codebook, hashed n-gram tables, values, counts
    num_clips: int
    num_frames: int
    codebook_size: int
    ngram_orders: list[int]
    table_size: int
    value_shape: list[int]
    used_codes: int
    occupied_slots: dict[str, int]  # per n-gram order
    collision_rate: dict[str, float]  # per n-gram order

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "engram_stats": [
                {
                    "ngram_order": int(order),
                    "occupied_slots": self.occupied_slots[order],
                    "collision_rate": self.collision_rate[order],
                    "codebook_size": self.codebook_size,
                    "used_codes": self.used_codes,
                    "table_size": self.table_size,
                    "num_frames": self.num_frames,
                }
                for order in sorted(self.occupied_slots)
            ]
        }


class TrainStep(Record):
    """One optimizer step of a training run (means over workers and accumulated micro-steps)."""

    step: int
    loss: float  # what the optimiser minimised
    lr: float  # of the first parameter group (see lrs for every group)
    terms: dict[str, float] = Field(default_factory=dict)  # other named losses
    grad_norm: float | None = None  # total L2 norm before clipping
    samples_per_s: float | None = None  # global samples of the step / its wall time
    data_wait_s: float | None = None  # time the step waited for its batches (worker 0)
    lrs: list[float] = Field(default_factory=list)  # every parameter group's lr


class CheckpointParent(Record):
    """What a training run started from: a committed checkpoint or official weights."""

    kind: str  # parent / weights
    family: str
    training_stage: str = ""
    artifact_id: str = ""  # the parent checkpoint artifact (kind == parent)
    sha256: str = ""  # weights file hash
    transfer: dict[str, int] = Field(default_factory=dict)  # weights transfer counts


class TrainedCheckpoint(Record):
    """A trained model of one family (train stage output) and its lineage.

    Clips, feature files and bank are the item's input artifacts in the catalog
    (``artifacts.input_artifact_ids``); ``parent`` names the checkpoint it started from.
    """

    family: str  # the model family (``generators.registry``) that rebuilds and samples it
    checkpoint: ArtifactRef  # safetensors weights
    model_config_json: str  # the family's model spec JSON, to rebuild the network
    steps: int
    num_processes: int  # world size (Ray Train workers)
    train_clips: list[str]
    resumed_from_step: int
    history: list[TrainStep]
    training_stage: str = "main"
    parent: CheckpointParent | None = None
    config_hash: str = ""  # the train config's params hash
    bank_sha256: str = ""
    manifest_fingerprint: str = ""
    worker_restarts: int = 0  # lost workers Ray Train replaced during the run

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "train_metrics": [
                {
                    "step": h.step,
                    "loss": h.loss,
                    "lr": h.lr,
                    "num_processes": self.num_processes,
                    "grad_norm": h.grad_norm,
                    "samples_per_s": h.samples_per_s,
                    "terms_json": json.dumps(h.terms, sort_keys=True),
                    "family": self.family,
                    "training_stage": self.training_stage,
                }
                for h in self.history
            ]
        }


class CommittedVersion(Record):
    """One committed ``done`` output of a stage (any version, not only the current one)."""

    item_key: str
    record_type: str
    record_json: str

    def record(self) -> Record:
        return record_from_json(self.record_type, self.record_json)


class CommittedHistory(Record):
    """Every committed ``done`` version of an aggregate stage's output, oldest first (what a
    stage with ``history_of`` gets as ``shared["<stage>@history"]``, e.g. every checkpoint
    the train stage ever committed, for the generate stage)."""

    stage: str
    versions: list[CommittedVersion]

    def records(self) -> list[Record]:
        return [v.record() for v in self.versions]


RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (
        SourceClip,
        NormalizedClip,
        FaceTrack,
        QualityVerdict,
        ClipFeatures,
        MemoryBank,
        TrainedCheckpoint,
        CommittedHistory,
        GeneratedClip,
        ClipMetrics,
        EvalSetMetrics,
    )
}


def record_from_json(type_name: str, payload: str) -> Record:
    """Rebuild a committed record; unknown type names are a catalog/code mismatch."""
    try:
        cls = RECORD_TYPES[type_name]
    except KeyError as exc:
        raise ValueError(f"unknown record type {type_name!r} in catalog") from exc
    return cls.model_validate_json(payload)
