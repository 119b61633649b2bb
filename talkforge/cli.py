"""The ``talkforge`` command line: ingest, datasets, run, resume, status, sql, failures, lineage,
versions, runs, report, serve (Prefect deployments), dashboard (browser).

Errors are one clear line plus where to look (the run's log file, ``talkforge failures``);
full tracebacks go to ``<data_root>/logs/<run_id>.log``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from flows.env import prefect_defaults

os.environ.update(prefect_defaults("WARNING"))  # before anything imports prefect

import typer

from storage.catalog import ReadOnlyQueryError
from talkforge import ops
from talkforge.cli_catalog import catalog_app, catalog_at, snapshot_rows
from talkforge.cli_common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    SetOpt,
    console,
    err,
    fail,
    load_pipeline_config,
    open_catalog,
    print_rows,
)
from talkforge.cli_models import models_app
from talkforge.progress import RichReporter

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(models_app, name="models")
app.add_typer(catalog_app, name="catalog")


def _quiet_prefect_console() -> None:
    """Keep Prefect's console handler (tracebacks, state lines) off the terminal: the CLI
    prints one line per failure itself; the run log and the Prefect UI keep the detail."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.CRITICAL + 1)


def _execute(request: dict[str, Any]) -> str:
    """Call the entry flow in this process with progress bars; one clear line on failure.

    Without a configured Prefect server, a temporary one boots while the run gets ready
    (:mod:`flows.temporary_server`) and stops when this process exits.
    """
    from flows.temporary_server import temporary_server

    with temporary_server() as wait_ready:
        return _execute_flow(request, wait_ready)


def _execute_flow(request: dict[str, Any], wait_ready: Callable[[], None]) -> str:
    from flows.pipeline import LocalHooks, local_hooks, talkforge_run
    from flows.request import run_log_path
    from models.registry import ModelUnavailableError
    from storage.catalog import Catalog
    from talkforge.config import ConfigError

    reporter = RichReporter(console)
    started: dict[str, Any] = {}

    def on_start(run_id: str, run: Any, catalog: Catalog) -> None:
        started.update(run_id=run_id, data_root=run.config.data_root, catalog=catalog)
        console.print(
            f"run [bold]{run_id}[/] · stages: {', '.join(run.options.stages)}"
            f" · data: {run.config.data_root}"
        )

    hooks = LocalHooks(reporter, " ".join(["talkforge", *sys.argv[1:]]), on_start)
    _quiet_prefect_console()
    run_id = ""
    try:
        wait_ready()
        with reporter, local_hooks(hooks):
            state = talkforge_run(**request, return_state=True)
        run_id = started.get("run_id", "")
        outcome = state.result(raise_on_failure=False)
    except KeyboardInterrupt:
        run_id = started.get("run_id", "")
        fail(f"run {run_id} interrupted; continue with `talkforge resume {run_id}`", 130)
    if isinstance(outcome, ConfigError | ValueError) and not run_id:
        fail(str(outcome), 2)
    if isinstance(outcome, ModelUnavailableError):
        fail(f"missing weights, nothing was run: {outcome}")
    if isinstance(outcome, BaseException) or not state.is_completed():
        where = (
            f"\n  see {run_log_path(started['data_root'], run_id)} and "
            f"`talkforge status --run {run_id}`"
            if run_id
            else ""
        )
        fail(f"run {run_id or '(not started)'} failed: {type(outcome).__name__}: {outcome}{where}")
    catalog = started["catalog"]
    print_rows(ops.stage_status(catalog, run_id), title=f"run {run_id}")
    failed = ops.failures(catalog)
    if failed:
        console.print(f"[yellow]{len(failed)} item(s) failed[/]: `talkforge failures` lists them")
    return run_id


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    stages: Annotated[str | None, typer.Option(help="comma-separated stage names")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="first stage")] = None,
    until: Annotated[str | None, typer.Option(help="last stage")] = None,
    limit: Annotated[int | None, typer.Option(help="at most N items per stage", min=1)] = None,
    retry_failed: Annotated[bool, typer.Option(help="also retry permanent failures")] = False,
    force: Annotated[bool, typer.Option(help="take over stage leases of a crashed run")] = False,
) -> None:
    """Run the pipeline (or some stages) on a config; committed items are skipped."""
    from talkforge.engine import select_stages

    load_pipeline_config(config, set_)
    try:
        select_stages(stages.split(",") if stages else None, from_, until)
    except ValueError as exc:
        fail(str(exc), 2)
    _execute(
        {
            "config": str(config),
            "overrides": list(set_ or []),
            "stages": stages.split(",") if stages else None,
            "from_stage": from_,
            "until_stage": until,
            "limit": limit,
            "retry_failed": retry_failed,
            "force": force,
        }
    )


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    retry_failed: Annotated[bool, typer.Option(help="also retry permanent failures")] = False,
    force: Annotated[bool, typer.Option(help="take over stage leases of a crashed run")] = False,
) -> None:
    """Continue a run with the resolved config it was started with (a new run id).

    Works for any run in the catalog, whether the CLI, a deployment or Python started it.
    """
    _execute(
        {
            "config": str(config),
            "overrides": list(set_ or []),
            "resume_of": run_id,
            "retry_failed": retry_failed,
            "force": force,
        }
    )


@app.command()
def status(
    run: Annotated[str | None, typer.Option("--run", help="run id (default: latest)")] = None,
    as_of: Annotated[str | None, typer.Option(help="read the catalog as of a run/snapshot")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Per stage of a run: done / filtered / failed / pending / skipped counts."""
    catalog = catalog_at(open_catalog(config, set_), as_of)
    run_id = run or ops.latest_run_id(catalog)
    info = ops.run_info(catalog, run_id) if run_id else None
    if info is None:
        fail("no runs yet; start one with `talkforge run`")
    state = info["last_event"]
    if state == "started":
        state = "started, no end recorded (still running, or killed: `talkforge resume`)"
    console.print(f"run [bold]{run_id}[/] · {state} · {info['command']}")
    print_rows(ops.stage_status(catalog, run_id), title="stages")


@app.command()
def sql(
    query: Annotated[
        str | None, typer.Argument(help="a single SELECT over the catalog views")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="read the query from a file (e.g. dashboards/*.sql)"),
    ] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    as_of: Annotated[str | None, typer.Option(help="read the catalog as of a run/snapshot")] = None,
) -> None:
    """Read-only SQL over the catalog (tables: clips, faces, quality, ... and current_*).

    Pass the query as the argument, or ``--file`` for a saved one (a query starting with a
    ``--`` comment would otherwise read as an option; ``talkforge sql -- "..."`` also works).
    """
    if (query is None) == (file is None):
        fail("give a query or --file, not both or neither", 2)
    if file is not None:
        try:
            query = file.read_text()
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}", 2)
    assert query is not None
    catalog = catalog_at(open_catalog(config, set_), as_of)
    try:
        rows = catalog.query_readonly(query).to_pylist()
    except ReadOnlyQueryError as exc:
        fail(str(exc), 2)
    except Exception as exc:  # duckdb errors: show the message, not a traceback
        fail(f"query failed: {exc}", 2)
    print_rows(rows, fmt=fmt)


@app.command()
def failures(
    stage: Annotated[str | None, typer.Option(help="only this stage")] = None,
    kind: Annotated[str | None, typer.Option(help="only this error kind")] = None,
    history: Annotated[bool, typer.Option("--all", help="every attempt, not only current")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Failed items with their typed error, attempt and whether a resume retries them."""
    rows = ops.failures(open_catalog(config, set_), stage, kind, history)
    print_rows(rows, title="failures", fmt=fmt)


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(help="artifact id or clip id")],
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Where an artifact or a clip came from, stage by stage."""
    rows = ops.lineage(open_catalog(config, set_), target)
    if not rows:
        fail(f"nothing in the catalog for {target!r}")
    print_rows(rows, title=f"lineage of {target}", fmt=fmt)


@app.command()
def versions(
    stage: Annotated[str | None, typer.Argument(help="stage (none: catalog snapshots)")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Catalog snapshots per run (for --as-of), or every version of a stage's outputs."""
    catalog = open_catalog(config, set_)
    if stage is None:
        print_rows(snapshot_rows(catalog), title="catalog versions (use --as-of RUN|SNAPSHOT)")
        return
    print_rows(ops.versions(catalog, stage), title=f"versions of {stage}")


@app.command()
def plan(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    stages: Annotated[str | None, typer.Option(help="comma-separated stage names")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="first stage")] = None,
    until: Annotated[str | None, typer.Option(help="last stage")] = None,
    retry_failed: Annotated[bool, typer.Option(help="also retry permanent failures")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Dry run: per stage, items cached / would run / retried / dropped, and why."""
    from talkforge.engine import Engine, RunOptions, select_stages
    from talkforge.plan_report import dry_run

    cfg = load_pipeline_config(config, set_)
    try:
        chosen = select_stages(stages.split(",") if stages else None, from_, until)
    except ValueError as exc:
        fail(str(exc), 2)
    engine = Engine(cfg, config_path=str(config))
    try:
        rows = dry_run(engine, RunOptions(stages=chosen, retry_failed=retry_failed))
    finally:
        engine.close()
    print_rows(rows, title="plan (nothing run)", fmt=fmt)


@app.command()
def report(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    folder: Annotated[Path, typer.Option("--dir", help="folder of saved SELECTs")] = Path(__file__)
    .resolve()
    .parents[1]
    / "dashboards",
) -> None:
    """Run every saved dashboard query (dashboards/*.sql) and print one table each."""
    catalog = open_catalog(config, set_)
    results = ops.report(catalog, folder)
    if not results:
        fail(f"no .sql files in {folder}")
    for name, rows, error in results:
        if error:
            err.print(f"[red]{name}: {error}[/]")
        else:
            print_rows(rows, title=name)


@app.command()
def ingest(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Read the configured datasets' metadata into the catalog (no download)."""
    cfg = load_pipeline_config(config, set_)
    try:
        rows = ops.ingest(cfg)
    except (OSError, ValueError) as exc:
        fail(f"cannot read dataset metadata: {exc}", 2)
    print_rows(rows, title="ingested", fmt=fmt)
    if fmt == "table":
        console.print("[dim]query: talkforge sql 'SELECT * FROM current_manifest LIMIT 10'[/]")


@app.command()
def datasets(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Ingested datasets with their licence terms, clips, hours, speakers and languages."""
    rows = ops.datasets(open_catalog(config, set_))
    if not rows and fmt == "table":
        fail("no dataset ingested yet; run `talkforge ingest` (or `talkforge run`)")
    print_rows(rows, title="datasets", fmt=fmt)


@app.command()
def quality(
    dataset: Annotated[str | None, typer.Option(help="only this dataset")] = None,
    histogram: Annotated[
        str | None, typer.Option("--histogram", help="show the score distribution of this rule")
    ] = None,
    bins: int = 10,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Per dataset and rule: clips failed / removed, score quantiles, rules failing all or none."""
    catalog = open_catalog(config, set_)
    if histogram:
        rows = ops.score_histogram(catalog, histogram, dataset, bins)
        if not rows and fmt == "table":
            fail(f"no measured values for rule {histogram!r}")
        print_rows(rows, title=f"{histogram} scores", fmt=fmt)
        return
    print_rows(ops.quality_rules(catalog, dataset), title="quality rules", fmt=fmt)


@app.command()
def runs(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, limit: int = 20) -> None:
    """Recent runs and how they ended."""
    print_rows(ops.list_runs(open_catalog(config, set_), limit), title="runs")


@app.command()
def serve(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    ingest_cron: Annotated[
        str, typer.Option(help="cron schedule of the ingest deployment ('' for none)")
    ] = "0 * * * *",
    limit: Annotated[int | None, typer.Option(help="at most N flow runs at once", min=1)] = None,
    join_ray: Annotated[
        str | None, typer.Option(help="first join this Ray cluster (host:port) as a 0-CPU node")
    ] = None,
) -> None:
    """Serve the deployments (pipeline, each stage, ingest, report) to the Prefect server.

    Needs PREFECT_API_URL (a `prefect server start` or the compose stack); runs started
    from the UI, the API or a schedule execute in subprocesses of this process.
    """
    from flows.env import USER_LOGGING_LEVEL

    os.environ["PREFECT_LOGGING_LEVEL"] = USER_LOGGING_LEVEL or "INFO"  # a daemon's log
    load_pipeline_config(config, set_)
    from flows.deployments import ServeError, serve_deployments

    try:
        serve_deployments(str(config), list(set_ or []), ingest_cron or None, limit, join_ray)
    except ServeError as exc:
        fail(str(exc), 2)


@app.command()
def dashboard(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to serve on")] = 8501,
) -> None:
    """The browser dashboard (runs, failures, quality, datasets, training, evaluation)."""
    from talkforge.dashboard import streamlit_command

    load_pipeline_config(config, set_)
    command = streamlit_command(str(config), list(set_ or []), host, port)
    console.print(f"dashboard on http://{host}:{port} (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(command[0], command)  # noqa: S606 - streamlit replaces this process


def main() -> None:
    app()


if __name__ == "__main__":
    main()
