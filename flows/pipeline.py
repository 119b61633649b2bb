"""Prefect flows: the typed entry flow ``talkforge-run`` and the per-stage subflow.

``talkforge-run`` is the one way a run starts — the CLI, a deployment (``talkforge serve``)
and Python all call it — so every run does the same things in the same order: validate the
request (:mod:`flows.request`), preflight the models, record the ``runs`` row, run the
selected stages as subflows, record how it ended, publish a summary. Its parameters are
what an operator fills in the Prefect UI form; Prefect validates them.

A Prefect task covers a *shard* of items (``execution.shard_size``), never one item, so a
run over tens of thousands of clips creates hundreds of task runs, not tens of thousands.
Which items run is decided by the engine from the catalog, not by Prefect's result cache:
results are not persisted and caching is off (``NO_CACHE``), so a resumed run is a new
flow run that skips committed items.

The leading stages with nothing to do (:meth:`talkforge.engine.Engine.settle_current`) are
planned and recorded in one task of the run's flow, without a subflow, slot, lease or
executor; they publish no stage artifacts (the run summary lists them). A fully cached
re-run is therefore one flow run with two tasks.

Stage subflows send no heartbeats of their own; the run's flow does (a crashed process
stops both). Prefect joins a flow's heartbeat thread, which sleeps in 1 s steps, when the
flow ends: about 0.6 s per stage subflow.

Each stage holds a Prefect global concurrency limit named after the catalog and stage
(one slot) while it plans and runs, so two runs on one Prefect server never process the
same stage of one catalog at once — the second waits, visibly, in the UI. The catalog's
own stage lease (:mod:`storage.lease`, taken by the engine) covers runs that do not share
a Prefect server.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any

from flows.env import prefect_defaults
from flows.request import ResolvedRun, StageName

os.environ.update(prefect_defaults("INFO"))

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, TerminationSignal
from prefect.settings import temporary_settings
from pydantic import Field

from flows import request as req
from flows.artifacts import StageProgress, publish_run_summary, publish_stage_tables
from storage.catalog import Catalog
from storage.lease import held_by_live_run
from talkforge.engine import Engine, PlannedItem, RunOptions, StagePlan, StageSummary
from talkforge.plan import LogReporter, Reporter, new_run_id
from talkforge.stages import STAGE_ORDER

log = logging.getLogger(__name__)

DASHBOARD_URL = os.environ.get("TALKFORGE_DASHBOARD_URL", "http://127.0.0.1:8501")


@dataclass
class LocalHooks:
    """In-process extras a caller of the entry flow may attach (the CLI's progress bars)."""

    reporter: Reporter | None = None
    command: str = ""
    on_start: Callable[[str, ResolvedRun, Catalog], None] | None = None  # the run's catalog


_HOOKS: ContextVar[LocalHooks | None] = ContextVar("talkforge_hooks", default=None)
_ENGINES: dict[str, Engine] = {}


@contextmanager
def local_hooks(hooks: LocalHooks) -> Iterator[None]:
    """Attach ``hooks`` to entry-flow calls made in this context."""
    token = _HOOKS.set(hooks)
    try:
        yield
    finally:
        _HOOKS.reset(token)


@task(name="plan-stage", cache_policy=NO_CACHE, persist_result=False)
def plan_stage(engine: Engine, run_id: str, stage: str, options: RunOptions) -> StagePlan:
    return engine.plan(run_id, stage, options)


@task(name="settle-current-stages", cache_policy=NO_CACHE, persist_result=False)
def settle_current(engine: Engine, run_id: str, options: RunOptions) -> list[StageSummary]:
    return engine.settle_current(run_id, options.stages, options)


@task(name="run-shard", cache_policy=NO_CACHE, persist_result=False)
def run_shard(engine: Engine, plan: StagePlan, shard: list[PlannedItem]) -> StageSummary:
    return engine.execute(plan, shard)


def stage_limit_name(engine: Engine, stage: str) -> str:
    """The global concurrency limit guarding ``stage`` of this engine's catalog."""
    where = engine.catalog.config.uri or str(engine.catalog.root.resolve())
    return f"talkforge-{hashlib.sha256(where.encode()).hexdigest()[:12]}-{stage}"


SLOT_LEASE_S = 60.0  # the server's minimum; renewed every 45 s, a dead holder's slot frees in ~75 s
SLOT_POLL_S = 10.0  # how often a waiting run re-checks whether the holder is still alive


@contextmanager
def stage_slot(
    name: str, orphaned: Callable[[], bool], waiting_note: str = "", poll_s: float = SLOT_POLL_S
) -> Iterator[None]:
    """Hold the one slot of global concurrency limit ``name`` (created on first use).

    Waits as long as another run holds it, logging ``waiting_note`` once. The slot is a
    Prefect lease of :data:`SLOT_LEASE_S` renewed in the background; if the holder's process
    dies, the server frees it when the lease runs out (plus up to one 15 s sweep of its
    repossessor). A server whose leases lived in its memory and died with the holder (the
    ephemeral server of a killed CLI run) leaves the slot occupied with no lease to expire:
    while waiting, ``orphaned()`` (the catalog's stage lease has no live holder) tells such
    a slot apart from a live one, and it is reset. A racing run that slips through then
    still meets the catalog lease, which is the authority. A failed renewal (server briefly
    away) does not stop the stage: the catalog's own stage lease still guards it.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
    hold = {
        "occupy": 1,
        "strict": True,
        "lease_duration": SLOT_LEASE_S,
        "raise_on_lease_renewal_failure": False,
    }
    with ExitStack() as stack:
        for attempt in itertools.count():
            try:
                wait_s = poll_s if attempt else min(poll_s, 2.0)  # a free slot: no waiting
                stack.enter_context(concurrency(name, timeout_seconds=wait_s, **hold))
                break
            except TimeoutError:
                if orphaned():
                    log.warning("%s: its holder is gone; freeing the orphaned slot", name)
                    with get_client(sync_client=True) as client:
                        client.update_global_concurrency_limit(
                            name, GlobalConcurrencyLimitUpdate(active_slots=0)
                        )
                elif attempt == 0:
                    log.warning("waiting for %s: %s", name, waiting_note or "another run")
        yield


@flow(name="talkforge-stage", persist_result=False)
def stage_flow(run_id: str, stage: StageName, options: RunOptions) -> dict[str, Any]:
    """Run one stage of a run: plan, then shards on the executor, then the stage's tables."""
    engine = _ENGINES[run_id]
    busy = f"another run is processing stage {stage} of this catalog; this run waits for it"

    def orphaned() -> bool:
        return not held_by_live_run(engine.catalog, stage)

    with stage_slot(stage_limit_name(engine, stage), orphaned, busy):
        plan = plan_stage.with_options(task_run_name=f"plan-{stage}")(
            engine, run_id, stage, options
        )
        progress = StageProgress(plan)
        total = StageSummary(stage=stage)
        try:
            for index, shard in enumerate(plan.shards(engine.config.execution.shard_size)):
                part = run_shard.with_options(task_run_name=f"{stage}-shard-{index:04d}")(
                    engine, plan, shard
                )
                for name in ("done", "filtered", "failed"):
                    setattr(total, name, getattr(total, name) + getattr(part, name))
                total.seconds += part.seconds
                progress.advance(part)
        finally:
            engine.executor_release(stage)
        summary = engine.summarize(plan, total)
    publish_stage_tables(engine.catalog, run_id, summary)
    return vars(summary)


def _label_flow_run(run_id: str, run: ResolvedRun) -> None:
    """Name the flow run after the talkforge run; tag it with config and stages."""
    flow_run_id = runtime.flow_run.id
    if not flow_run_id:
        return
    config_tag = f"config:{os.path.basename(run.config_path) or 'inline'}"
    tags = {*runtime.flow_run.tags, config_tag, *(f"stage:{s}" for s in run.options.stages)}
    if run.resumed:
        tags.add(f"resume-of:{run.resumed}")
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=run_id, tags=sorted(tags))


def _command(hooks: LocalHooks) -> str:
    """Who started the run, as recorded in ``runs.command``."""
    if hooks.command:
        return hooks.command
    deployment = runtime.deployment.name
    if deployment:
        return f"prefect deployment talkforge-run/{deployment} (flow run {runtime.flow_run.id})"
    return f"python: talkforge_run (flow run {runtime.flow_run.id})"


@flow(name="talkforge-run", persist_result=False)
def talkforge_run(
    config: str = "default",
    overrides: list[str] | None = None,
    stages: list[StageName] | None = None,
    from_stage: StageName | None = None,
    until_stage: StageName | None = None,
    limit: Annotated[int | None, Field(ge=1)] = None,
    retry_failed: bool = False,
    force: bool = False,
    resume_of: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline (or some stages): preflight, record the run, run stages, record the end.

    Returns ``{"run_id", "state", "stages": [per-stage summary], "log_path"}``. A failure
    in a stage is recorded as the run's end (``failed`` with the message) and re-raised,
    so the flow run fails too; items that failed on bad data do not fail the run.

    Args:
        config: config name (configs/NAME.yaml) or path to a YAML file.
        overrides: key.path=value items, e.g. faces.detect_every_k=3.
        stages: only these stages (empty: all, in pipeline order).
        from_stage: first stage to run.
        until_stage: last stage to run.
        limit: at most this many items per stage.
        retry_failed: also retry permanent failures.
        force: take over stage leases held by a run that died.
        resume_of: continue this run id (or 'latest') with its recorded config and options.
    """
    hooks = _HOOKS.get() or LocalHooks()
    run = req.resolve(
        config,
        overrides or [],
        list(stages or []),
        from_stage,
        until_stage,
        limit,
        retry_failed,
        force,
        resume_of,
    )
    engine = Engine(
        run.config, config_path=run.config_path, reporter=hooks.reporter or LogReporter()
    )
    try:
        engine.preflight(run.options.stages)
    except BaseException:
        engine.close()
        raise
    run_id = new_run_id()
    _label_flow_run(run_id, run)
    handler = req.open_run_log(run.config.data_root, run_id)
    log_path = req.run_log_path(run.config.data_root, run_id)
    engine.start_run(_command(hooks), run.options, run_id=run_id)
    _ENGINES[run_id] = engine
    get_run_logger().info("talkforge run %s: stages %s", run_id, ", ".join(run.options.stages))
    if hooks.on_start:
        hooks.on_start(run_id, run, engine.catalog)
    state, message, summaries = "failed", "", []
    try:
        current = settle_current(engine, run_id, run.options)
        summaries = [vars(s) for s in current]
        if current:
            get_run_logger().info(
                "nothing to run in stage(s) %s: recorded as current, no subflow",
                ", ".join(s.stage for s in current),
            )
        settled = {s.stage for s in current}
        for stage in STAGE_ORDER:
            if stage in run.options.stages and stage not in settled:
                with temporary_settings(updates={"flows.heartbeat_frequency": None}):
                    summaries.append(
                        stage_flow.with_options(flow_run_name=f"{run_id}-{stage}")(
                            run_id=run_id, stage=stage, options=run.options
                        )
                    )
        state = "finished"
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt | TerminationSignal)
        state = "interrupted" if stopped else "failed"
        message = f"{type(exc).__name__}: {exc}"
        log.exception("run %s %s", run_id, state)
        raise
    finally:
        _ENGINES.pop(run_id, None)
        try:
            engine.close()
        finally:
            engine.finish_run(run_id, state, run.options, message)
            publish_run_summary(
                engine.catalog, run_id, state, message, DASHBOARD_URL, str(log_path)
            )
            req.close_run_log(handler)
    return {"run_id": run_id, "state": state, "stages": summaries, "log_path": str(log_path)}
