"""Records of the generate → evaluate → evaluate_set stages (re-exported by tasks.records).

Rows of the evaluation table are keyed by **family, checkpoint, setting**: ``self`` (the
clip's own audio: a reconstruction of the ground truth) or ``cross`` (another held-out
clip's audio). The ground truth is scored as its own row (family ``ground_truth``), as the
MuseTalk paper's table does: PSNR at its cap, SSIM 1, LPIPS 0, CSIM 1, APD 0, FID/FVD 0, and
the real clip's Sync-C/D with its own audio.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from storage.store import ArtifactRef
from tasks.base import Record

GROUND_TRUTH = "ground_truth"  # the family label of the reference row
Setting = Literal["self", "cross"]


class GeneratedVideo(Record):
    """One video generated for a held-out clip: which model made it, in which setting."""

    family: str
    checkpoint: str  # label: "<training_stage>-step<N>-<sha12>", or the baseline's name
    checkpoint_sha256: str  # the weights file's hash
    generator_origin: str  # trained (a train stage checkpoint) / official (imported weights)
    setting: Setting
    audio_clip_id: str  # the clip whose audio (and audio features) drove the generation
    audio: ArtifactRef  # that wav, muxed into the video and scored by SyncNet
    video: ArtifactRef
    num_frames: int


class GeneratedClip(Record):
    """Every video generated for one held-out clip (per checkpoint and setting).

    ``notes``: what was not generated and why (no other held-out clip for cross-audio, a
    checkpoint whose features the clip lacks, ...).
    """

    clip_id: str
    fps: float
    videos: list[GeneratedVideo]
    notes: list[str] = Field(default_factory=list)


class MetricRow(Record):
    """Clip-level metric values of one generated video, or of the ground truth."""

    family: str
    checkpoint: str
    setting: Setting
    generator_origin: str  # trained / official / ground_truth
    audio_clip_id: str
    num_frames: int
    values: dict[str, float]
    features: ArtifactRef | None = None  # Inception / I3D features for FID / FVD


class ClipMetrics(Record):
    """All evaluation rows of one held-out clip: each generated video and the ground truth.

    ``model_origins``: metric network family → ``random-init`` or ``pretrained`` (numbers
    from random-init stand-ins only check the plumbing).
    """

    clip_id: str
    num_frames: int
    rows: list[MetricRow]
    model_origins: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def row(self, family: str, setting: str, checkpoint: str | None = None) -> MetricRow:
        """The row of ``family`` (and ``checkpoint``) in ``setting``; KeyError if absent."""
        for r in self.rows:
            if r.family == family and r.setting == setting and checkpoint in (None, r.checkpoint):
                return r
        raise KeyError(f"{self.clip_id}: no {family}/{checkpoint or '*'} row in {setting}")

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        origin = origins_label(self.model_origins)
        return {
            "eval_metrics": [
                {
                    "metric": metric,
                    "value": float(value),
                    "num_frames": r.num_frames,
                    "family": r.family,
                    "checkpoint": r.checkpoint,
                    "setting": r.setting,
                    "row": GROUND_TRUTH if r.family == GROUND_TRUTH else "generated",
                    "level": "clip",
                    "model_origin": origin,
                    "generator_origin": r.generator_origin,
                    "audio_clip_id": r.audio_clip_id,
                }
                for r in self.rows
                for metric, value in sorted(r.values.items())
            ]
        }


def origins_label(origins: dict[str, str]) -> str:
    return ",".join(sorted(set(origins.values())))


class EvalSummaryRow(Record):
    """One cell of the evaluation table: a metric of a family / checkpoint / setting."""

    family: str
    checkpoint: str
    setting: Setting
    metric: str
    level: Literal["clip", "set"]
    value: float  # clip metrics: mean over clips; set metrics: the set's value
    std: float | None = None  # over clips (clip metrics)
    num_clips: int
    num_frames: int
    higher_is_better: bool
    generator_origin: str
    model_origin: str


class EvalSetMetrics(Record):
    """The ``evaluate_set`` output: the evaluation run's table (``eval_summary``).

    ``summary`` holds every metric of every family / checkpoint / setting (the ground truth
    included), set-level values (FID, FVD, ``fvd_at_<n>``) computed here from the clips'
    features. ``notes``: why a set metric is absent (e.g. FVD needs 2 clips ≥ 36 frames).
    """

    split_rule: str
    num_heldout_clips: int
    summary: list[EvalSummaryRow]
    notes: list[str] = Field(default_factory=list)

    def stats_rows(self) -> dict[str, list[dict[str, Any]]]:
        rows = [r.model_dump() for r in self.summary]
        for r in rows:
            r["split_rule"] = self.split_rule
        return {"eval_summary": rows}
