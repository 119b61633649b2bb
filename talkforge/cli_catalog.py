"""``talkforge catalog compact | vacuum --older-than | migrate`` and the catalog's versions."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from storage.catalog import Catalog, SnapshotNotFoundError
from talkforge.cli_common import DEFAULT_CONFIG, ConfigOpt, SetOpt, fail, open_catalog, print_rows

catalog_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Keep the catalog: compact, vacuum, migrate."
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> int:
    """'30d', '12h', '90m', '45s' -> seconds."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise ValueError(f"age {text!r}: use a number and s/m/h/d, e.g. 30d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def catalog_at(catalog: Catalog, as_of: str | None) -> Catalog:
    """``catalog`` itself, or read-only as of a run id / snapshot id (clear error if neither)."""
    if as_of is None:
        return catalog
    try:
        return catalog.as_of(as_of)
    except SnapshotNotFoundError as exc:
        fail(str(exc), 2)
        raise


def snapshot_rows(catalog: Catalog) -> list[dict[str, Any]]:
    """Every run with the snapshots it committed (``--as-of RUN`` reads its last one)."""
    return catalog.query(
        "SELECT s.run_id, s.first_snapshot, s.last_snapshot, s.commits, s.last_at, "
        "l.event AS state, r.command FROM run_snapshots s "
        "LEFT JOIN runs_latest l USING (run_id) "
        "LEFT JOIN (SELECT run_id, command FROM runs WHERE event = 'started') r USING (run_id) "
        "ORDER BY s.last_snapshot"
    ).to_pylist()


@catalog_app.command()
def compact(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None) -> None:
    """Flush small commits into parquet and merge small files (safe while a run writes)."""
    print_rows([open_catalog(config, set_).compact()], title="compacted")


@catalog_app.command()
def vacuum(
    older_than: Annotated[str, typer.Option(help="expire snapshots older than this, e.g. 30d")],
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Expire old snapshots (no time travel before them) and delete unreferenced files."""
    try:
        seconds = parse_age(older_than)
    except ValueError as exc:
        fail(str(exc), 2)
        raise
    print_rows([open_catalog(config, set_).vacuum(seconds)], title="vacuumed")


@catalog_app.command()
def migrate(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None) -> None:
    """Import an old parquet-part catalog (<data_root>/catalog/<table>/part-*.parquet)."""
    from storage.migrate import migrate_parts

    catalog = open_catalog(config, set_)
    counts = migrate_parts(catalog)
    if not counts:
        fail(f"no old parquet parts under {catalog.root}; nothing to migrate")
    print_rows([{"table": t, "rows": n} for t, n in counts.items()], title="migrated")
