"""One-shot import of an old parquet-part catalog into the DuckLake catalog.

The old format kept ``<root>/<table>/part-*.parquet`` (one part per table per commit).
:func:`migrate_parts` reads every table's parts (union by name: older parts may lack
newer columns), casts them to today's schema and commits all tables in one DuckLake
transaction, then moves the part folders to ``<root>/legacy-parts/`` so a second run has
nothing to import and the old files stay for inspection until deleted by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pyarrow as pa

from storage.catalog import Catalog
from storage.schema import ALL_TABLES


def legacy_tables(root: Path) -> dict[str, list[Path]]:
    """table -> its old part files under ``root`` (only tables that have some)."""
    found = {}
    for table in ALL_TABLES:
        parts = sorted((root / table).glob("part-*.parquet"))
        if parts:
            found[table] = parts
    return found


def _read(parts: list[Path], schema: pa.Schema) -> pa.Table:
    con = duckdb.connect(":memory:")
    try:
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
        data = con.execute(
            f"SELECT * FROM read_parquet([{files}], union_by_name=true)"  # noqa: S608
        ).to_arrow_table()
    finally:
        con.close()
    columns = {
        f.name: (
            data.column(f.name).cast(f.type)
            if f.name in data.column_names
            else pa.nulls(data.num_rows, f.type)
        )
        for f in schema
    }
    return pa.Table.from_pydict(columns, schema=schema)


def migrate_parts(catalog: Catalog) -> dict[str, int]:
    """Import every old part under ``catalog.root``; returns rows imported per table."""
    found = legacy_tables(catalog.root)
    if not found:
        return {}
    counts = {}
    with catalog.transaction("catalog migrate") as tx:
        for table, parts in found.items():
            data = _read(parts, ALL_TABLES[table])
            tx.append(table, data)
            counts[table] = data.num_rows
    legacy = catalog.root / "legacy-parts"
    legacy.mkdir(exist_ok=True)
    for table in found:
        shutil.move(str(catalog.root / table), str(legacy / table))
    return counts
