"""Prefect flows: one per stage, and the pipeline flow that chains them in order.

Flows only wire the engine's steps together. A Prefect task covers a *shard* of items
(``execution.shard_size``), never one item, so a run over tens of thousands of clips
creates hundreds of task runs, not tens of thousands. Which items run is decided by the
engine from the catalog, not by Prefect's result cache: results are not persisted and
caching is off (``NO_CACHE``), so a resumed run is a new flow run that skips committed
items.

Flow parameters are plain strings (run id, resolved config YAML, options JSON) so any
stage flow can be triggered alone, from the CLI, from Python or from a Prefect
deployment; the engine for a run is built once per process and shared by its subflows.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from talkforge.config import parse_config
from talkforge.engine import Engine, PlannedItem, Reporter, RunOptions, StagePlan, StageSummary
from talkforge.stages import STAGE_ORDER

_ENGINES: dict[str, Engine] = {}


def register_engine(run_id: str, engine: Engine) -> None:
    """Let flows of ``run_id`` use an engine built by the caller (CLI, tests)."""
    _ENGINES[run_id] = engine


def _engine(run_id: str, config_yaml: str, reporter: Reporter | None = None) -> Engine:
    if run_id not in _ENGINES:
        import yaml

        config = parse_config(yaml.safe_load(config_yaml) or {}, f"run {run_id}")
        _ENGINES[run_id] = Engine(config, reporter=reporter)
    return _ENGINES[run_id]


@task(name="plan-stage", cache_policy=NO_CACHE, persist_result=False)
def plan_stage(engine: Engine, run_id: str, stage: str, options: RunOptions) -> StagePlan:
    return engine.plan(run_id, stage, options)


@task(name="run-shard", cache_policy=NO_CACHE, persist_result=False)
def run_shard(engine: Engine, plan: StagePlan, shard: list[PlannedItem]) -> StageSummary:
    return engine.execute(plan, shard)


def _stage_flow_body(
    stage: str, run_id: str, config_yaml: str, options_json: str
) -> dict[str, Any]:
    engine = _engine(run_id, config_yaml)
    options = RunOptions.model_validate_json(options_json)
    plan = plan_stage.with_options(task_run_name=f"plan-{stage}")(engine, run_id, stage, options)
    total = StageSummary(stage=stage)
    try:
        for index, shard in enumerate(plan.shards(engine.config.execution.shard_size)):
            part = run_shard.with_options(task_run_name=f"{stage}-shard-{index:04d}")(
                engine, plan, shard
            )
            for name in ("done", "filtered", "failed"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.seconds += part.seconds
    finally:
        engine.executor_release(stage)
    return vars(engine.summarize(plan, total))


def _make_stage_flow(stage: str) -> Any:
    @flow(name=f"talkforge-{stage}", persist_result=False, validate_parameters=False)
    def stage_flow(run_id: str, config_yaml: str, options_json: str) -> dict[str, Any]:
        return _stage_flow_body(stage, run_id, config_yaml, options_json)

    stage_flow.__doc__ = f"Run the {stage!r} stage for a run: plan, then shards on the executor."
    return stage_flow


STAGE_FLOWS: dict[str, Any] = {stage: _make_stage_flow(stage) for stage in STAGE_ORDER}


@flow(name="talkforge-pipeline", persist_result=False, validate_parameters=False)
def pipeline_flow(run_id: str, config_yaml: str, options_json: str) -> list[dict[str, Any]]:
    """Chain the selected stages in pipeline order; each stage is its own subflow."""
    options = RunOptions.model_validate_json(options_json)
    summaries = []
    for stage in STAGE_ORDER:
        if stage in options.stages:
            summaries.append(
                STAGE_FLOWS[stage].with_options(flow_run_name=f"{run_id}-{stage}")(
                    run_id=run_id, config_yaml=config_yaml, options_json=options_json
                )
            )
    return summaries
