"""Shared pieces of the command line: config loading, errors, table/CSV/JSON output."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from storage.catalog import Catalog
from talkforge.config import ConfigError, PipelineConfig, load_config

console = Console()
err = Console(stderr=True)

DEFAULT_CONFIG = Path("configs/default.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override, e.g. faces.detect_every_k=3")
]


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def load_pipeline_config(config: Path, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)
        raise  # unreachable, for type checkers


def open_catalog(config: Path, overrides: list[str] | None) -> Catalog:
    cfg = load_pipeline_config(config, overrides)
    return Catalog(cfg.data_root / "catalog", cfg.catalog)


def print_rows(rows: list[dict[str, Any]], title: str = "", fmt: str = "table") -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    if fmt == "csv":
        import csv

        if rows:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return
    if not rows:
        console.print(f"[dim]{title + ': ' if title else ''}no rows[/]")
        return
    table = Table(title=title or None, show_lines=False)
    for i, col in enumerate(rows[0]):  # the first column names the row: never wrapped
        table.add_column(str(col), overflow="fold", no_wrap=i == 0)
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
