"""The engine: decides what each stage must run, runs it, and commits results.

How resume decides (the users' main need)::

    item_key = sha256(stage, code_version, stage config hash, model fingerprints,
                      upstream item keys | source record)

For every stage the engine computes the key each item *should* have under the current
config, then looks the key up in the catalog: a committed ``done``/``filtered`` row means
the item is cached and skipped; a permanent failure is skipped unless ``retry_failed``;
a retryable failure runs again until ``max_attempts``; anything else runs. Changing a
stage's config or code version changes its keys and therefore every downstream key,
while upstream keys stay equal: exactly the changed stage and what follows re-run.

Every plan is recorded so "current" always means the version the latest run asked for,
and ``talkforge status`` can say what is done, failed, pending or skipped: its counts in
``stage_runs``, and a ``plans`` row per item that runs, changes version or is dropped.
Keys and decisions are computed inside the catalog (:mod:`talkforge.planner`); this
module holds runs, leases, execution and commits (rows: :mod:`talkforge.outcome_rows`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from models.registry import fingerprint
from storage.catalog import Catalog, from_columns, to_arrow
from storage.lease import Lease
from storage.lease import acquire as lease_acquire
from storage.lease import release as lease_release
from storage.store import ArtifactStore
from talkforge.candidates import plan_candidates
from talkforge.config import PipelineConfig
from talkforge.executors import LocalExecutor, RayExecutor, make_executor
from talkforge.outcome_rows import discovery_failure, outcome_rows
from talkforge.plan import (
    LogReporter,
    PlannedItem,
    Reporter,
    RunOptions,
    StagePlan,
    StageSummary,
    gc_paused,
    new_run_id,
    now_utc,
    select_stages,
)
from talkforge.planner import Rejected, decide
from talkforge.split_planner import SplitPlanner
from talkforge.stages import STAGE_ORDER, STAGES
from tasks.base import (
    StageEnv,
    stable_hash,
)
from tasks.runner import Outcome, WorkItem

log = logging.getLogger(__name__)


class Engine:
    """Plans, executes and commits stages for one pipeline config."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        config_path: str = "",
        reporter: Reporter | None = None,
        executor: LocalExecutor | RayExecutor | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.data_root = config.data_root
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.data_root / "catalog", config.catalog)
        self.store = ArtifactStore(config.store_uri)
        self.reporter: Reporter = reporter or LogReporter()
        self._executor = executor
        self._owns_executor = executor is None
        self._fingerprint_cache: dict[str, dict[str, Any]] = {}
        self._leases: dict[str, Lease] = {}
        self._split = SplitPlanner(self.catalog, config.split)

    @property
    def executor(self) -> LocalExecutor | RayExecutor:
        if self._executor is None:
            self._executor = make_executor(self.config.ray, self.config.execution)
        return self._executor

    def close(self) -> None:
        """Release stage leases and worker pools (the executor only if this engine made it)."""
        for stage in list(self._leases):
            self._release_lease(stage)
        if self._executor is None:
            return
        if self._owns_executor:
            self._executor.close()
        else:
            for stage in STAGE_ORDER:
                self._executor.release(stage)

    # ------------------------------------------------------------------ runs
    def start_run(self, command: str, options: RunOptions, run_id: str | None = None) -> str:
        run_id = run_id or new_run_id()
        self._run_event(run_id, "started", command, options)
        return run_id

    def finish_run(self, run_id: str, event: str, options: RunOptions, message: str = "") -> None:
        self._run_event(run_id, event, "", options, message)

    def _run_event(
        self, run_id: str, event: str, command: str, options: RunOptions, message: str = ""
    ) -> None:
        yaml_text = self.config.to_yaml()
        self.catalog.append(
            "runs",
            [
                {
                    "run_id": run_id,
                    "event": event,
                    "event_at": now_utc(),
                    "command": command,
                    "stages": options.stages,
                    "config_path": self.config_path,
                    "config_yaml": yaml_text,
                    "config_hash": stable_hash(yaml_text),
                    "options_json": options.model_dump_json(),
                    "message": message,
                    "snapshot_id": self.catalog.current_snapshot(),
                }
            ],
        )

    def preflight(self, stages: list[str]) -> dict[str, dict[str, Any]]:
        """Fingerprint every model the selected stages need; missing weights fail here."""
        return {name: self._fingerprints(name) for name in stages}

    # ------------------------------------------------------------------ planning
    def stage_env(self, run_id: str, stage: str) -> StageEnv:
        return StageEnv(
            data_root=str(self.data_root),
            store_uri=self.config.store_uri,
            run_id=run_id,
            model_fingerprints=self._fingerprints(stage),
            holdout_fraction=self.config.split.holdout_fraction,
            split_seed=self.config.split.seed,
            heldout_ids=self._split.heldout_ids(run_id) if STAGES[stage].uses_split else None,
        )

    def _fingerprints(self, stage: str) -> dict[str, Any]:
        """Model fingerprints of a stage, computed once per engine (preflight, then plan)."""
        if stage not in self._fingerprint_cache:
            probe_env = StageEnv(
                data_root=str(self.data_root), store_uri=self.config.store_uri, run_id="preflight"
            )
            specs = STAGES[stage](self.config.stage(stage), probe_env).model_specs()
            self._fingerprint_cache[stage] = {
                spec.family: fingerprint(spec, self.data_root) for spec in specs
            }
        return self._fingerprint_cache[stage]

    def stage_version(self, stage: str) -> dict[str, Any]:
        """What every item key of ``stage`` starts from: code version, config hash, weights."""
        return {
            "stage": stage,
            "code_version": STAGES[stage].code_version,
            "config_hash": self.config.stage(stage).params_hash(),
            "models": {k: v.sha256 for k, v in sorted(self._fingerprints(stage).items())},
        }

    def plan(
        self, run_id: str, stage: str, options: RunOptions, *, dry_run: bool = False
    ) -> StagePlan:
        """Decide every item's action with a constant number of catalog queries.

        Holds the stage's lease (:mod:`storage.lease`) from here until :meth:`summarize`
        or :meth:`close`. ``dry_run`` takes no lease and writes nothing.
        """
        if not dry_run and stage not in self._leases:
            self._leases[stage] = lease_acquire(self.catalog, stage, run_id, options.force)
        with gc_paused():
            return self._plan(run_id, stage, options, dry_run)

    def _plan(self, run_id: str, stage: str, options: RunOptions, dry_run: bool) -> StagePlan:
        plan, fresh = self._decide(run_id, stage, options, record=not dry_run)
        if not dry_run:
            self.catalog.append_many(self._plan_tables(plan, fresh, options))
            self.reporter.stage_planned(plan)
        return plan

    def _decide(
        self, run_id: str, stage: str, options: RunOptions, *, record: bool
    ) -> tuple[StagePlan, list[Rejected]]:
        """The stage's plan, and its rejected rows never recorded before. ``record=False``
        writes nothing (a changed manifest is read, not ingested; the split is not saved)."""
        stage_cls = STAGES[stage]
        env = self.stage_env(run_id, stage)
        plan = StagePlan(run_id=run_id, stage=stage, env=env)
        common = self.stage_version(stage)
        candidates = plan_candidates(
            self.catalog,
            stage_cls,
            self.config.stage(stage),
            env,
            plan,
            options,
            record=record,
        )
        rejected = [
            Rejected(raw_id, f, stable_hash({**common, "raw_id": raw_id, "message": f.message}))
            for raw_id, f in plan.discovery_failures
        ]
        fresh = decide(
            self.catalog,
            candidates,
            plan,
            common,
            rejected,
            options,
            self.config.execution.max_attempts,
        )
        if stage_cls.uses_split:  # a split with nothing held out says so, not silence
            if record:
                self._split.record(run_id)
            if not plan.total and self._split.plan(run_id).problem():
                plan.blocked_reason = self._split.plan(run_id).problem()
        return plan, fresh

    def _plan_tables(
        self, plan: StagePlan, fresh: list[Rejected], options: RunOptions
    ) -> dict[str, Any]:
        """The rows that record a plan: its items' actions, its counts, new rejections."""
        stage_cls = STAGES[plan.stage]
        planned_at = now_utc()
        rows = [(i.item_id, i.item_key, i.action) for i in plan.items]
        rows += [(item_id, "", "dropped") for item_id in plan.dropped]
        tables: dict[str, Any] = self._outcome_rows(plan, {}, [discovery_failure(r) for r in fresh])
        tables["plans"] = from_columns(
            "plans",
            {
                "run_id": [plan.run_id] * len(rows),
                "stage": [plan.stage] * len(rows),
                "item_id": [r[0] for r in rows],
                "item_key": [r[1] for r in rows],
                "action": [r[2] for r in rows],
                "planned_at": [planned_at] * len(rows),
            },
        )
        tables["stage_runs"] = [
            {
                "run_id": plan.run_id,
                "stage": plan.stage,
                "planned_at": planned_at,
                "complete": options.limit is None,
                "lists_all": len(plan.items) == plan.total,
                "items": plan.total,
                "to_run": plan.count("run"),
                "retried": plan.retried,
                "cached_done": plan.count("cached") - plan.cached_filtered,
                "cached_filtered": plan.cached_filtered,
                "skip_failed": plan.count("skip_failed"),
                "dropped": len(plan.dropped),
                "blocked_reason": plan.blocked_reason,
                "code_version": stage_cls.code_version,
                "config_hash": self.config.stage(plan.stage).params_hash(),
                "inputs_digest": plan.digest,
                "stage_item_rows": plan.item_rows,
            }
        ]
        return tables

    def settle_current(
        self, run_id: str, stages: list[str], options: RunOptions
    ) -> list[StageSummary]:
        """Plan and record the leading ``stages`` that have nothing to do; the rest is left.

        A stage is *current* when its plan lists no item (nothing runs or changes version),
        drops and newly rejects nothing, reads no changed manifest and is not blocked: then
        recording it changes nothing a later stage reads, so the next one can be planned
        before it is recorded. Those plans are
        made without a stage lease or executor and recorded in **one** commit, with the
        same rows a normal plan writes (``stage_runs``, ``plans``); the pipeline then runs
        only the stages from the first one with work onwards. Another run working on a
        stage meanwhile only makes that stage not current (its items are still to run),
        except after its last commit, when "all cached" is what the catalog says too.
        """
        settled: list[tuple[StagePlan, list[Rejected]]] = []
        for stage in stages:
            plan, fresh = self._decide(run_id, stage, options, record=False)
            changes = plan.items or plan.count("run") or plan.dropped or fresh
            if changes or plan.blocked_reason or plan.sources_read:
                break
            settled.append((plan, fresh))
        if not settled:
            return []
        if any(STAGES[p.stage].uses_split for p, _ in settled):
            self._split.record(run_id)
        parts: dict[str, list[pa.Table]] = {}
        for plan, fresh in settled:
            for table, rows in self._plan_tables(plan, fresh, options).items():
                data = rows if isinstance(rows, pa.Table) else to_arrow(table, rows)
                parts.setdefault(table, []).append(data)
        self.catalog.append_many({t: pa.concat_tables(p) for t, p in parts.items()})
        summaries = []
        for plan, _ in settled:
            self.reporter.stage_planned(plan)
            summaries.append(self.summarize(plan, StageSummary(stage=plan.stage), compact=False))
        self.catalog.maybe_compact()
        return summaries

    # ------------------------------------------------------------------ execution
    def execute(self, plan: StagePlan, items: list[PlannedItem]) -> StageSummary:
        """Run ``items`` of a plan on the executor, committing results as they arrive."""
        started = time.perf_counter()
        summary = StageSummary(stage=plan.stage)
        if not items:
            return summary
        stage_cls = STAGES[plan.stage]
        cfg = self.config.stage(plan.stage)
        by_id = {i.item_id: i for i in items}
        buffer: list[Outcome] = []

        def on_outcome(outcome: Outcome) -> None:
            buffer.append(outcome)
            setattr(summary, outcome.status, getattr(summary, outcome.status) + 1)
            self.reporter.item_finished(plan.stage, outcome)
            if len(buffer) >= self.config.execution.commit_every:
                self._commit(plan, by_id, buffer)
                buffer.clear()

        inputs = plan.inputs_for(items)
        work = [
            WorkItem(
                item_id=i.item_id,
                item_key=i.item_key,
                attempt=i.attempt,
                inputs=inputs.get(i.item_id),
            )
            for i in items
        ]
        try:
            self.executor.run(stage_cls, cfg, plan.env, work, on_outcome)
        finally:
            self._commit(plan, by_id, buffer)
        summary.seconds = time.perf_counter() - started
        return summary

    def run_stage(self, run_id: str, stage: str, options: RunOptions) -> StageSummary:
        """Plan and execute a whole stage without Prefect (library use and tests)."""
        plan = self.plan(run_id, stage, options)
        summary = self.execute(plan, plan.to_run)
        self.executor_release(stage)
        return self.summarize(plan, summary)

    def summarize(
        self, plan: StagePlan, ran: StageSummary, *, compact: bool = True
    ) -> StageSummary:
        ran.planned = plan.total
        ran.cached = plan.count("cached")
        ran.skipped_failed = plan.count("skip_failed")
        ran.blocked_reason = plan.blocked_reason
        self._release_lease(plan.stage)
        if compact:
            self.catalog.maybe_compact()
        self.reporter.stage_finished(ran)
        return ran

    def _release_lease(self, stage: str) -> None:
        lease = self._leases.pop(stage, None)
        if lease is not None:
            lease_release(self.catalog, lease)

    def executor_release(self, stage: str) -> None:
        if self._executor is not None:
            self._executor.release(stage)

    def _commit(
        self, plan: StagePlan, by_id: dict[str, PlannedItem], outcomes: list[Outcome]
    ) -> None:
        if outcomes:
            self.catalog.append_many(self._outcome_rows(plan, by_id, outcomes))

    def _outcome_rows(
        self, plan: StagePlan, by_id: dict[str, PlannedItem], outcomes: list[Outcome]
    ) -> dict[str, list[dict[str, Any]]]:
        code_version = STAGES[plan.stage].code_version
        config_hash = self.config.stage(plan.stage).params_hash()
        return outcome_rows(plan, code_version, config_hash, by_id, outcomes)


__all__ = [
    "Engine",
    "PlannedItem",
    "Reporter",
    "RunOptions",
    "StagePlan",
    "StageSummary",
    "new_run_id",
    "select_stages",
]
