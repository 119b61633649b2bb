"""The engine's side of the train / held-out split: plan it from the manifest, record it.

The split is planned once per run, lazily (the first stage with ``uses_split`` asks, after
the download stage has recorded the manifests), from the ``current_manifest`` rows with
status ``ok`` — every clip the pipeline may ever see, downloaded or not, so the split does
not depend on which downloads succeeded. It is written to the ``splits`` table when it
differs from the last one recorded, so ``SELECT * FROM current_split`` shows every clip's
group and side and old runs' splits stay queryable.
"""

from __future__ import annotations

import logging

from storage.catalog import Catalog
from talkforge.config import SplitConfig
from talkforge.plan import now_utc
from tasks.split import SplitClip, SplitPlan, plan_split

log = logging.getLogger(__name__)


class SplitPlanner:
    """Plans (once per run) and records the split of a catalog's current manifest."""

    def __init__(self, catalog: Catalog, config: SplitConfig):
        self.catalog = catalog
        self.config = config
        self._plans: dict[str, SplitPlan] = {}
        self._recorded: set[str] = set()

    def plan(self, run_id: str) -> SplitPlan:
        if run_id not in self._plans:
            rows = self.catalog.query(
                "SELECT clip_id, dataset, source_id, speaker, subset FROM current_manifest "
                "WHERE status = 'ok'"
            ).to_pylist()
            clips = [
                SplitClip(
                    clip_id=r["clip_id"],
                    dataset=r["dataset"],
                    source_id=r["source_id"] or "",
                    speaker=r["speaker"] or "",
                    subset=r["subset"] or "",
                )
                for r in rows
            ]
            cfg = self.config
            plan = plan_split(
                clips,
                holdout_fraction=cfg.holdout_fraction,
                seed=cfg.seed,
                group_by=cfg.group_by,
                rule=cfg.rule,
            )
            if plan.problem():
                log.warning("%s", plan.problem())
            self._plans[run_id] = plan
        return self._plans[run_id]

    def heldout_ids(self, run_id: str) -> frozenset[str] | None:
        """The held-out clip ids, or None without a manifest (clips committed by a library
        user or a test straight into the catalog): :func:`tasks.split.is_heldout` then
        treats each clip as its own group."""
        plan = self.plan(run_id)
        return plan.heldout_ids if plan.groups else None

    def record(self, run_id: str) -> None:
        """Write this run's split to ``splits`` unless it equals the last one recorded."""
        if run_id in self._recorded:
            return
        plan = self.plan(run_id)
        last = self.catalog.query(
            "SELECT arg_max(split_hash, planned_at) AS h FROM splits"
        ).to_pylist()
        if plan.groups and (not last or last[0]["h"] != plan.split_hash):
            at = now_utc()
            self.catalog.append(
                "splits", [{"run_id": run_id, "planned_at": at, **row} for row in plan.rows()]
            )
        self._recorded.add(run_id)
