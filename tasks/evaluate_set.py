"""Evaluate-set stage: FID and FVD over all evaluated clips of a family, checkpoint, setting.

Set-level metrics compare feature distributions, so they exist only for a set: FID from the
Inception features of every generated vs every ground-truth frame, FVD from the I3D features
of each clip's frames 20–36 (LatentSync's protocol), and the long-sequence curve ``fvd_at_n``
from the 16-frame windows of the first ``n`` frames (32, 128, 256, 512) of the clips that
long. The ground-truth row compares the ground truth with itself (0 by construction). A
metric that lacks the 2 samples a covariance needs is left out with a note.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import numpy as np
from safetensors.numpy import load_file

from metrics.fid import fid
from metrics.fvd import CURVE_LENGTHS, fvd
from tasks.base import AggregateInputs, FailureKind, ItemContext, ItemFailure, Stage, StageConfig
from tasks.records import ClipMetrics, EvalSetGroup, EvalSetMetrics


class EvaluateSetConfig(StageConfig):
    pass


def _sets() -> list[tuple[str, str]]:
    """(metric name, feature key) of every set-level metric."""
    return [("fid", "inception"), ("fvd", "i3d_protocol")] + [
        (f"fvd_at_{n}", f"i3d_upto_{n}") for n in CURVE_LENGTHS
    ]


class EvaluateSetStage(Stage[EvaluateSetConfig]):
    name: ClassVar[str] = "evaluate_set"
    code_version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("evaluate",)
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = EvaluateSetConfig

    def process(self, inputs: AggregateInputs, ctx: ItemContext) -> EvalSetMetrics:
        groups: dict[tuple[str, str, str], list[ClipMetrics]] = defaultdict(list)
        for item in inputs.items:
            rec = item.get("evaluate", ClipMetrics)
            groups[(rec.family, rec.checkpoint, rec.setting)].append(rec)
        if not groups:
            raise ItemFailure(FailureKind.FORMAT, "evaluate_set: no evaluated clips")
        return EvalSetMetrics(
            groups=[self._group(key, recs, ctx) for key, recs in sorted(groups.items())]
        )

    def _group(
        self, key: tuple[str, str, str], recs: list[ClipMetrics], ctx: ItemContext
    ) -> EvalSetGroup:
        feats: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        origins: dict[str, str] = {}
        for rec in sorted(recs, key=lambda r: r.clip_id):
            origins.update(rec.model_origins)
            if rec.features is None:
                continue
            for name, array in load_file(str(ctx.local_path(rec.features))).items():
                feature, row = name.split("/")
                feats[feature][row].append(array)
        values: dict[str, float] = {}
        reference: dict[str, float] = {}
        notes: list[str] = []
        for metric, feature in _sets():
            rows = feats.get(feature)
            if not rows:
                continue
            gen, gt = np.concatenate(rows["generated"]), np.concatenate(rows["ground_truth"])
            if min(len(gen), len(gt)) < 2:
                notes.append(f"{metric}: {len(gen)} sample(s), a covariance needs 2")
                continue
            score = fid if feature == "inception" else fvd
            values[metric] = score(gen, gt)
            reference[metric] = score(gt, gt)
        family, checkpoint, setting = key
        return EvalSetGroup(
            family=family,
            checkpoint=checkpoint,
            setting=setting,
            num_clips=len(recs),
            num_frames=sum(r.num_frames for r in recs),
            values=values,
            reference=reference,
            model_origins=origins,
            notes=notes,
        )
