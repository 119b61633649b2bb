"""Why DuckLake: the catalog's commit pattern on DuckLake, Delta Lake and Iceberg, one run.

    pip install --target /tmp/alt --no-deps deltalake==1.6.6 arro3-core pyiceberg==0.12.0 \\
        mmh3 strictyaml pyroaring sortedcontainers cachetools pyparsing
    PYTHONPATH=/tmp/alt .venv/bin/python benchmarks/bench_table_formats.py [--commits 100]

The alternatives are not project dependencies (nothing in talkforge uses them); they are
installed into a throwaway folder for this measurement only. The pattern is the engine's:
``--commits`` commits of a 4-item batch to three tables (stats, artifacts, items), then a
reader opens the table(s) and runs a count and a group-by in duckdb. DuckLake (the
project's ``Catalog``, SQLite metadata) commits the three tables in one transaction; Delta
Lake (delta-rs) and Iceberg (pyiceberg, SQLite ``SqlCatalog``) commit each table on its
own — neither offers a multi-table transaction in these libraries, so a crash between the
three leaves a half-visible batch. Measured: median commit latency (the three tables),
data files written, the reader's open + query time, and the same after each format's
compaction where it has one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.catalog import Catalog, to_arrow  # noqa: E402

TABLES = ("clips", "artifacts", "items")
QUERY = "SELECT count(*) AS n, count(DISTINCT item_id) AS ids FROM items"
GROUP = "SELECT status, count(*) FROM items GROUP BY status"


def batch(k: int) -> dict[str, pa.Table]:
    now = datetime.now(UTC)
    base = [
        {"run_id": "r", "stage": "faces", "item_id": f"c{k}-{i}", "item_key": f"k{k}-{i}"}
        | {"created_at": now}
        for i in range(4)
    ]
    rows = {
        "clips": [{**b, "dataset": "d", "duration_s": 5.0} for b in base],
        "artifacts": [{**b, "artifact_id": f"a{k}-{i}"} for i, b in enumerate(base)],
        "items": [{**b, "status": "done", "attempt": 1} for b in base],
    }
    return {t: to_arrow(t, r) for t, r in rows.items()}


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*.parquet"))


def measure(
    commit: Callable[[dict[str, pa.Table]], None],
    read: Callable[[], dict[str, pa.Table]],
    commits: int,
) -> dict[str, Any]:
    latency = []
    for k in range(commits):
        data = batch(k)
        t = time.perf_counter()
        commit(data)
        latency.append(time.perf_counter() - t)
    t = time.perf_counter()
    tables = read()
    con = duckdb.connect()
    for name, table in tables.items():
        con.register(name, table)
    result = con.execute(QUERY).fetchone()
    con.execute(GROUP).fetchall()
    read_s = time.perf_counter() - t
    assert result == (4 * commits, 4 * commits), result
    return {"commit_ms_median": 1000 * statistics.median(latency), "read_s": read_s}


def bench_ducklake(root: Path, commits: int) -> dict[str, Any]:
    cat = Catalog(root)

    def read() -> dict[str, pa.Table]:
        return {"items": Catalog(root).query("SELECT * FROM lake.items")}

    out = measure(lambda d: cat.append_many(d), read, commits)
    out["files"] = files_under(root)
    out["inlined_rows"] = cat.file_stats()["inlined_rows"]
    t = time.perf_counter()
    cat.compact()
    out["compact_s"] = time.perf_counter() - t
    t = time.perf_counter()
    read()
    out["read_after_compact_s"] = time.perf_counter() - t
    out["files_after_compact"] = files_under(root / "data") - cat.vacuum(0)["files_deleted"]
    return out


def bench_delta(root: Path, commits: int) -> dict[str, Any]:
    from deltalake import DeltaTable, write_deltalake

    def commit(data: dict[str, pa.Table]) -> None:
        for name, table in data.items():  # three commits: no multi-table transaction
            write_deltalake(str(root / name), table, mode="append")

    def read() -> dict[str, pa.Table]:
        return {"items": DeltaTable(str(root / "items")).to_pyarrow_table()}

    out = measure(commit, read, commits)
    out["files"] = files_under(root)
    t = time.perf_counter()
    for name in TABLES:
        table = DeltaTable(str(root / name))
        table.optimize.compact()
        table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    out["compact_s"] = time.perf_counter() - t
    t = time.perf_counter()
    read()
    out["read_after_compact_s"] = time.perf_counter() - t
    out["files_after_compact"] = files_under(root)
    return out


def bench_iceberg(root: Path, commits: int) -> dict[str, Any]:
    from pyiceberg.catalog.sql import SqlCatalog

    catalog = SqlCatalog(
        "bench", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root}"
    )
    catalog.create_namespace("tf")
    first = batch(0)
    tables = {name: catalog.create_table(f"tf.{name}", first[name].schema) for name in TABLES}

    def commit(data: dict[str, pa.Table]) -> None:
        for name, table in data.items():  # three commits: no multi-table transaction
            tables[name].append(table)

    def read() -> dict[str, pa.Table]:
        return {"items": catalog.load_table("tf.items").scan().to_arrow()}

    out = measure(commit, read, commits)
    out["files"] = files_under(root)
    out["compact_s"] = None  # pyiceberg 0.12 has no data-file compaction
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=100)
    args = ap.parse_args()
    results: dict[str, Any] = {"commits": args.commits}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        for name, fn in (
            ("ducklake", bench_ducklake),
            ("delta", bench_delta),
            ("iceberg", bench_iceberg),
        ):
            root = Path(tmp) / name
            root.mkdir()
            try:
                results[name] = fn(root, args.commits)
            except ImportError as exc:
                results[name] = f"not installed ({exc.name}): see this file's docstring"
            print(name, json.dumps(results[name], default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
