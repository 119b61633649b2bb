"""What a run shows in the Prefect UI: a progress artifact per stage, tables per stage, a summary.

Artifacts are keyed by run and stage (``<run>-<stage>-counts``), so the UI's artifact page
keeps one history per key across runs. Every number comes from the catalog (the same
queries as ``talkforge status`` / ``failures`` / ``quality``), never from Prefect state,
so the UI and the CLI cannot disagree.
"""

from __future__ import annotations

import re
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from storage.catalog import Catalog
from talkforge import ops
from talkforge.plan import StagePlan, StageSummary


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) from run id and names."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class StageProgress:
    """One progress artifact per stage, updated after every shard."""

    def __init__(self, plan: StagePlan):
        self.total = len(plan.to_run)
        self.finished = 0
        self.stage = plan.stage
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0 if self.total else 100.0,
            key=artifact_key(plan.run_id, plan.stage, "progress"),
            description=f"{plan.stage}: {self.total} to run, {plan.count('cached')} cached",
        )

    def advance(self, part: StageSummary) -> None:
        self.finished += part.done + part.filtered + part.failed
        percent = 100.0 * self.finished / self.total if self.total else 100.0
        update_progress_artifact(
            self.artifact_id,
            progress=min(percent, 100.0),
            description=f"{self.stage}: {self.finished}/{self.total} items",
        )


def publish_stage_tables(catalog: Catalog, run_id: str, summary: StageSummary) -> None:
    """Counts, failures by kind and (for quality) removals per rule, as table artifacts."""
    stage = summary.stage
    counts = [
        {k: v for k, v in vars(summary).items() if k != "blocked_reason"}
        | {"blocked": summary.blocked_reason}
    ]
    create_table_artifact(
        counts, key=artifact_key(run_id, stage, "counts"), description=f"{stage} counts"
    )
    by_kind = ops.failures_by_kind(catalog, stage)
    create_table_artifact(
        by_kind or [{"error_kind": "none", "items": 0, "example": ""}],
        key=artifact_key(run_id, stage, "failures"),
        description=f"{stage}: current failures by kind (`talkforge failures --stage {stage}`)",
    )
    if stage == "quality":
        rules = [
            {
                k: r.get(k)
                for k in (
                    "dataset",
                    "rule",
                    "clips",
                    "failed",
                    "removed",
                    "unmeasured",
                    "attention",
                )
            }
            for r in ops.quality_rules(catalog)
        ]
        create_table_artifact(
            rules or [{"rule": "none"}],
            key=artifact_key(run_id, "quality-rules"),
            description="clips failed / removed per quality rule",
        )


def publish_run_summary(
    catalog: Catalog, run_id: str, state: str, message: str, dashboard_url: str, log_path: str
) -> None:
    """A markdown summary: state, per-stage table, where to look next (dashboard, log, CLI)."""
    rows = ops.stage_status(catalog, run_id)
    base = dashboard_url.rstrip("/")
    cols = ["stage", "items", "done", "filtered", "failed", "pending", "skipped", "dropped"]
    lines = [
        f"# talkforge run `{run_id}`: {state}",
        "",
        f"{message}" if message else "",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows),
        "",
        f"- Dashboard: [this run]({base}/?run={run_id}) · [failures]({base}/failures)"
        f" · [quality rules]({base}/quality)",
        f"- Full log with tracebacks: `{log_path}`",
        f"- Terminal: `talkforge status --run {run_id}` · `talkforge failures`"
        f" · `talkforge resume {run_id}`",
    ]
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(run_id, "summary"), description="run summary"
    )
