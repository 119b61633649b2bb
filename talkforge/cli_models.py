"""``talkforge models``: the weights a config needs — list, import, verify, download."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from talkforge.cli_common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    SetOpt,
    console,
    err,
    fail,
    load_pipeline_config,
    print_rows,
)

models_app = typer.Typer(
    no_args_is_help=True, help="Weights the config needs: list, import, verify, download."
)


@models_app.command("list")
def models_list(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    stages: Annotated[str | None, typer.Option(help="comma-separated stage names")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Every model the stages need, where its weights are expected, and whether present."""
    from talkforge.weights import needed_models

    cfg = load_pipeline_config(config, set_)
    rows = [
        {
            "stage": m.stage,
            "family": m.spec.family,
            "source": m.spec.source,
            "expected_at": str(m.path) if m.path else "(hub cache)",
            "status": m.status,
        }
        for m in needed_models(cfg, stages.split(",") if stages else None)
    ]
    print_rows(rows, title="models", fmt=fmt)
    missing = [r for r in rows if r["status"] == "missing"]
    if missing and fmt == "table":
        for r in missing:
            err.print(f"[red]missing[/] {r['family']}: talkforge models import {r['family']} PATH")
        raise typer.Exit(1)


@models_app.command("import")
def models_import(
    family: Annotated[str, typer.Argument(help="model family, as in `models list`")],
    source: Annotated[Path, typer.Argument(help="weights file or folder to copy in")],
    sha256: Annotated[str | None, typer.Option(help="expected sha256 of a single file")] = None,
    stage: Annotated[str | None, typer.Option(help="disambiguate a family used twice")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Copy official weights to where the config expects them; record size and sha256."""
    from talkforge.weights import find_model, import_weights

    cfg = load_pipeline_config(config, set_)
    try:
        model = find_model(cfg, family, stage)
        record = import_weights(model, source, sha256)
    except (KeyError, ValueError, OSError) as exc:
        fail(str(exc).strip("'\""), 2)
    total = sum(int(f["size_bytes"]) for f in record["files"].values())
    console.print(f"imported {family} → {model.path} ({len(record['files'])} files, {total} bytes)")


@models_app.command("verify")
def models_verify(
    family: Annotated[str | None, typer.Argument(help="one family (default: all)")] = None,
    sha256: Annotated[str | None, typer.Option(help="expected sha256 of a single file")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Re-hash weights (no cache) against their import record and an expected sha256."""
    from talkforge.weights import needed_models, verify_weights

    cfg = load_pipeline_config(config, set_)
    models = [m for m in needed_models(cfg) if family is None or m.spec.family == family]
    if not models:
        fail(f"no model family {family!r} in this config", 2)
    bad = 0
    for m in models:
        problems = [] if m.status == "tiny-random" else verify_weights(m, sha256)
        bad += bool(problems)
        state = "[red]" + "; ".join(problems) + "[/]" if problems else "[green]ok[/]"
        console.print(f"{m.stage:<9} {m.spec.family:<22} {state}")
    if bad:
        raise typer.Exit(1)


@models_app.command("download")
def models_download(
    family: Annotated[str, typer.Argument(help="a model configured by hub id")],
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Fetch a hub model into the hub cache (needs network; offline clusters use import)."""
    from talkforge.weights import download_weights, find_model

    cfg = load_pipeline_config(config, set_)
    try:
        path = download_weights(find_model(cfg, family))
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).strip("'\""), 2)
    console.print(f"downloaded {family} → {path}")
