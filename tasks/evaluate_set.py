"""Evaluate-set stage: the evaluation run's table (``eval_summary``), FID and FVD included.

Over every evaluated held-out clip, per family / checkpoint / setting (the ground truth is
family ``ground_truth``): clip-level metrics are averaged over clips (with their standard
deviation); set-level metrics compare feature distributions and exist only here — FID from
the Inception features of every generated vs every ground-truth frame of the same clips,
FVD from the I3D features of each clip's frames 20–36 (LatentSync's protocol), and the
long-sequence curve ``fvd_at_<n>`` from the 16-frame windows of the first ``n`` frames (32,
128, 256, 512) of the clips that long. The ground truth against itself scores FID/FVD 0. A
metric that lacks the 2 samples a covariance needs is left out with a note. The planned
split's rule is recorded with every row.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import numpy as np
from safetensors.numpy import load_file

from metrics.fid import fid
from metrics.fvd import CURVE_LENGTHS, fvd
from metrics.registry import METRICS, base_metric
from tasks.base import (
    AggregateInputs,
    FailureKind,
    ItemContext,
    ItemFailure,
    Stage,
    StageConfig,
    stable_hash,
)
from tasks.evaluate_set_config import EvaluateSetConfig
from tasks.records import ClipMetrics, EvalSetMetrics, EvalSummaryRow, MetricRow
from tasks.records_eval import GROUND_TRUTH, origins_label


def set_metrics() -> list[tuple[str, str]]:
    """(metric name, feature key) of every set-level metric."""
    return [("fid", "inception"), ("fvd", "i3d_protocol")] + [
        (f"fvd_at_{n}", f"i3d_upto_{n}") for n in CURVE_LENGTHS
    ]


Group = tuple[str, str, str]  # family, checkpoint, setting


class EvaluateSetStage(Stage[EvaluateSetConfig]):
    name: ClassVar[str] = "evaluate_set"
    code_version: ClassVar[str] = "2"  # 2: the eval_summary table, every checkpoint/setting
    requires: ClassVar[tuple[str, ...]] = ("evaluate",)
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = EvaluateSetConfig
    uses_split: ClassVar[bool] = True  # to name the held-out set in the table

    def process(self, inputs: AggregateInputs, ctx: ItemContext) -> EvalSetMetrics:
        clips = sorted(
            (item.get("evaluate", ClipMetrics) for item in inputs.items), key=lambda c: c.clip_id
        )
        groups: dict[Group, dict[str, MetricRow]] = defaultdict(dict)
        for clip in clips:
            for row in clip.rows:
                groups[(row.family, row.checkpoint, row.setting)][clip.clip_id] = row
        if not groups:
            raise ItemFailure(FailureKind.FORMAT, "evaluate_set: no evaluated clips")
        model_origin = origins_label({k: v for c in clips for k, v in c.model_origins.items()})
        truth = {s: rows for (f, _, s), rows in groups.items() if f == GROUND_TRUTH}
        summary: list[EvalSummaryRow] = []
        notes = sorted({n for c in clips for n in c.notes})
        for key in sorted(groups):
            rows = groups[key]
            summary += self._clip_rows(key, list(rows.values()), model_origin)
            gt = truth.get(key[2], {})
            reference = [gt[c] for c in rows if c in gt]
            made, why = self._set_rows(key, list(rows.values()), reference, model_origin, ctx)
            summary += made
            notes += why
        return EvalSetMetrics(
            split_rule=self.split_rule(),
            num_heldout_clips=len(clips),
            summary=summary,
            notes=notes,
        )

    def split_rule(self) -> str:
        """Which held-out set this table is about (``current_split`` has each clip's side)."""
        heldout = self.env.heldout_ids
        if heldout is None:
            return f"per clip (no manifest), seed {self.env.split_seed}"
        return f"{len(heldout)} held-out clips, ids sha256 {stable_hash(sorted(heldout))[:12]}"

    @staticmethod
    def _clip_rows(key: Group, rows: list[MetricRow], model_origin: str) -> list[EvalSummaryRow]:
        family, checkpoint, setting = key
        values: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            for metric, v in r.values.items():
                values[metric].append(v)
        return [
            EvalSummaryRow(
                family=family,
                checkpoint=checkpoint,
                setting=setting,
                metric=metric,
                level="clip",
                value=float(np.mean(vs)),
                std=float(np.std(vs)),
                num_clips=len(vs),
                num_frames=sum(r.num_frames for r in rows),
                higher_is_better=METRICS[base_metric(metric)].higher_is_better,
                generator_origin=rows[0].generator_origin,
                model_origin=model_origin,
            )
            for metric, vs in sorted(values.items())
        ]

    @staticmethod
    def _set_rows(
        key: Group,
        rows: list[MetricRow],
        reference: list[MetricRow],
        model_origin: str,
        ctx: ItemContext,
    ) -> tuple[list[EvalSummaryRow], list[str]]:
        """FID / FVD of the group's features against the same clips' ground truth."""
        family, checkpoint, setting = key
        gen = _features(rows, ctx)
        gt = _features(reference, ctx)
        out: list[EvalSummaryRow] = []
        notes: list[str] = []
        for metric, feature in set_metrics():
            if setting not in METRICS[base_metric(metric)].settings:
                continue
            a, b = gen.get(feature, []), gt.get(feature, [])
            if not a or not b:
                continue
            x, y = np.concatenate(a), np.concatenate(b)
            if min(len(x), len(y)) < 2:
                notes.append(f"{family}/{checkpoint}/{setting} {metric}: {len(x)} sample(s), "
                             "a covariance needs 2")  # fmt: skip
                continue
            score = fid if feature == "inception" else fvd
            out.append(
                EvalSummaryRow(
                    family=family,
                    checkpoint=checkpoint,
                    setting=setting,
                    metric=metric,
                    level="set",
                    value=score(x, y),
                    num_clips=len(a),
                    num_frames=sum(r.num_frames for r in rows),
                    higher_is_better=False,
                    generator_origin=rows[0].generator_origin,
                    model_origin=model_origin,
                )
            )
        return out, notes


def _features(rows: list[MetricRow], ctx: ItemContext) -> dict[str, list[np.ndarray]]:
    """Feature key → one array per row (clip) that has it."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        if r.features is None:
            continue
        for name, array in load_file(str(ctx.local_path(r.features))).items():
            out[name].append(array)
    return out
