"""The ``talkforge`` command line: ingest, datasets, run, resume, status, sql, failures, lineage,
versions, runs, report.

Errors are one clear line plus where to look (the run's log file, ``talkforge failures``);
full tracebacks go to ``<data_root>/logs/<run_id>.log``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import typer

from storage.catalog import ReadOnlyQueryError
from talkforge import ops
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
from talkforge.config import PipelineConfig, parse_config
from talkforge.progress import RichReporter

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(models_app, name="models")


def _setup_logging(data_root: Path, run_id: str) -> logging.Handler:
    """Send this run's log (INFO and up, full tracebacks) to <data_root>/logs/<run_id>.log."""
    log_dir = data_root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"{run_id}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in ("talkforge", "tasks", "models", "storage", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    for name in ("talkforge", "tasks", "models", "storage", "flows"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def _execute(cfg: PipelineConfig, config_path: str, options: Any, command: str) -> str:
    from flows.pipeline import pipeline_flow, register_engine
    from models.registry import ModelUnavailableError
    from talkforge.engine import Engine, new_run_id

    run_id = new_run_id()
    reporter = RichReporter(console)
    engine = Engine(cfg, config_path=config_path, reporter=reporter)
    try:
        engine.preflight(options.stages)
    except ModelUnavailableError as exc:
        fail(f"missing weights, nothing was run: {exc}")
    handler = _setup_logging(cfg.data_root, run_id)
    log_path = cfg.data_root / "logs" / f"{run_id}.log"
    engine.start_run(command, options, run_id=run_id)
    register_engine(run_id, engine)
    console.print(
        f"run [bold]{run_id}[/] · stages: {', '.join(options.stages)} · data: {cfg.data_root}"
    )
    try:
        with reporter:
            pipeline_flow(
                run_id=run_id, config_yaml=cfg.to_yaml(), options_json=options.model_dump_json()
            )
    except KeyboardInterrupt:
        engine.finish_run(run_id, "interrupted", options, "KeyboardInterrupt")
        fail(f"run {run_id} interrupted; continue with `talkforge resume {run_id}`", 130)
    except Exception as exc:
        logging.getLogger("talkforge").exception("run %s failed", run_id)
        engine.finish_run(run_id, "failed", options, f"{type(exc).__name__}: {exc}")
        fail(
            f"run {run_id} failed: {type(exc).__name__}: {exc}\n  see {log_path} "
            f"and `talkforge status --run {run_id}`"
        )
    finally:
        engine.close()
        _teardown_logging(handler)
    engine.finish_run(run_id, "finished", options)
    print_rows(ops.stage_status(engine.catalog, run_id), title=f"run {run_id}")
    failed = ops.failures(engine.catalog)
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
    limit: Annotated[int | None, typer.Option(help="at most N items per stage")] = None,
    retry_failed: Annotated[bool, typer.Option(help="also retry permanent failures")] = False,
) -> None:
    """Run the pipeline (or some stages) on a config; committed items are skipped."""
    from talkforge.engine import RunOptions, select_stages

    cfg = load_pipeline_config(config, set_)
    try:
        chosen = select_stages(stages.split(",") if stages else None, from_, until)
    except ValueError as exc:
        fail(str(exc), 2)
    options = RunOptions(stages=chosen, limit=limit, retry_failed=retry_failed)
    _execute(cfg, str(config), options, " ".join(["talkforge", *sys.argv[1:]]))


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    retry_failed: Annotated[bool, typer.Option(help="also retry permanent failures")] = False,
) -> None:
    """Continue a run with the resolved config it was started with (a new run id)."""
    import yaml

    from talkforge.engine import RunOptions

    catalog = open_catalog(config, set_)
    target = ops.latest_run_id(catalog) if run_id == "latest" else run_id
    info = ops.run_info(catalog, target) if target else None
    if info is None:
        fail(f"no run {run_id!r} in {catalog.root}; `talkforge runs` lists runs")
    cfg = parse_config(yaml.safe_load(info["config_yaml"]) or {}, f"run {target}")
    options = RunOptions.model_validate_json(info["options_json"])
    if retry_failed:
        options = options.model_copy(update={"retry_failed": True})
    _execute(cfg, info["config_path"], options, f"talkforge resume {target}")


@app.command()
def status(
    run: Annotated[str | None, typer.Option("--run", help="run id (default: latest)")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Per stage of a run: done / filtered / failed / pending / skipped counts."""
    catalog = open_catalog(config, set_)
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
    query: Annotated[str, typer.Argument(help="a single SELECT over the catalog views")],
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Read-only SQL over the catalog (tables: clips, faces, quality, ... and current_*)."""
    try:
        rows = open_catalog(config, set_).query_readonly(query).to_pylist()
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
    stage: Annotated[str, typer.Argument(help="stage name")],
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Every version of a stage's outputs (code version, config hash, models)."""
    print_rows(ops.versions(open_catalog(config, set_), stage), title=f"versions of {stage}")


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
    files = sorted(folder.glob("*.sql"))
    if not files:
        fail(f"no .sql files in {folder}")
    for path in files:
        try:
            rows = catalog.query_readonly(path.read_text()).to_pylist()
        except Exception as exc:
            err.print(f"[red]{path.name}: {exc}[/]")
            continue
        print_rows(rows, title=path.stem)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
