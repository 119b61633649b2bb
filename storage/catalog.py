"""The artifact catalog: append-only parquet parts with duckdb views on top.

Design (see README "Catalog"): every write is a new parquet file
``<root>/<table>/part-<time>-<uuid>.parquet`` written under a temporary name and renamed,
so any number of writers (Ray workers, two flow runs, two machines on a shared
filesystem) can append at once without locks and a reader never sees a half-written
part. Nothing is updated in place: a newer row supersedes an older one in the views.
Within one commit, stats and artifact rows are written before the ``items`` row, which is
the commit marker: a crash in between leaves rows that no view counts as current.

Views (all read-only):

- ``runs_latest``: the newest event per run.
- ``item_versions``: the newest row per (stage, item, key).
- ``current_plans``: per (stage, item) the key the most recent run asked for.
- ``current_items``: item_versions that match current_plans (the "current view").
- ``failures`` / ``current_failures``: failed attempts (all / current).
- ``current_<stats>`` for every stats table, plus ``artifact_versions``,
  ``current_artifacts``, ``eval_summary``, ``dataset_summary``, ``quality_summary``,
  ``quality_rules`` (per dataset and rule: clips failed and removed, removed by this rule
  alone, score quantiles, and an ``attention`` flag when a rule fails every clip or none).
- ``current_datasets`` / ``current_manifest``: the latest ingest of every dataset's
  published metadata (``talkforge ingest``), ``manifest_summary`` (clips, hours, speakers,
  licence per dataset) and ``clip_progress`` (every manifest clip with its download status).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.schema import ALL_TABLES, STATS_TABLES


class ReadOnlyQueryError(ValueError):
    """A query that is not a plain SELECT, refused by :meth:`Catalog.query_readonly`."""


class Catalog:
    """Append-only parquet tables under ``root`` with duckdb views for queries."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ writing
    def append(self, table: str, rows: Iterable[Mapping[str, Any]]) -> Path | None:
        """Append rows to ``table`` as one new parquet part; returns the part path."""
        rows = list(rows)
        if not rows:
            return None
        schema = ALL_TABLES[table]
        unknown = set().union(*(r.keys() for r in rows)) - set(schema.names)
        if unknown:
            raise ValueError(f"table {table!r} has no column(s) {sorted(unknown)}")
        columns = {name: [r.get(name) for r in rows] for name in schema.names}
        data = pa.Table.from_pydict(columns, schema=schema)
        folder = self.root / table
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = folder / f".tmp-{name}"
        pq.write_table(data, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = folder / name
        os.replace(tmp, final)
        return final

    def append_many(self, tables: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Append several tables in the given order (put ``items`` last: commit marker)."""
        for table, rows in tables.items():
            self.append(table, rows)

    # ------------------------------------------------------------------ reading
    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory duckdb connection with every table and view defined."""
        con = duckdb.connect(":memory:")
        for table, schema in ALL_TABLES.items():
            folder = self.root / table
            if folder.is_dir() and any(folder.glob("part-*.parquet")):
                pattern = str(folder / "part-*.parquet").replace("'", "''")
                con.execute(  # table names come from storage.schema, never from users
                    f"CREATE VIEW {table} AS SELECT * FROM "  # noqa: S608
                    f"read_parquet('{pattern}', union_by_name=true)"
                )
            else:
                con.register(f"_empty_{table}", schema.empty_table())
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")  # noqa: S608
        for sql in _VIEWS:
            con.execute(sql)
        for table in STATS_TABLES:
            con.execute(
                f"CREATE VIEW current_{table} AS SELECT s.* FROM {table} s "  # noqa: S608
                "JOIN current_items c ON s.stage = c.stage AND s.item_id = c.item_id "
                "AND s.item_key = c.item_key AND s.run_id = c.run_id"
            )
        for sql in _SUMMARY_VIEWS:
            con.execute(sql)
        return con

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run trusted internal SQL (the engine's own queries)."""
        con = self.connect()
        try:
            return con.execute(sql, params or []).fetch_arrow_table()
        finally:
            con.close()

    def query_readonly(self, sql: str) -> pa.Table:
        """Run an ops engineer's SQL: SELECT only, no file access outside the catalog.

        Three locks: every statement must parse as SELECT; the connection may read only the
        catalog folder (``allowed_directories`` + ``enable_external_access=false``); and
        the configuration is locked so the query cannot lift those settings.
        """
        con = self.connect()
        try:
            try:
                statements = con.extract_statements(sql)
            except duckdb.Error as exc:
                raise ReadOnlyQueryError(f"cannot parse query: {exc}") from exc
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                raise ReadOnlyQueryError("only a single SELECT statement is allowed")
            root = str(self.root.resolve()).replace("'", "''")
            con.execute(f"SET allowed_directories=['{root}/']")
            con.execute("SET enable_external_access=false")
            con.execute("SET lock_configuration=true")
            return con.execute(sql).fetch_arrow_table()
        finally:
            con.close()


_VIEWS = [
    """CREATE VIEW runs_latest AS
       SELECT * FROM runs
       QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY event_at DESC) = 1""",
    """CREATE VIEW item_versions AS
       SELECT * FROM items
       QUALIFY row_number() OVER (
         PARTITION BY stage, item_id, item_key ORDER BY created_at DESC, attempt DESC) = 1""",
    """CREATE VIEW current_plans AS
       SELECT * FROM plans
       QUALIFY row_number() OVER (PARTITION BY stage, item_id ORDER BY planned_at DESC) = 1""",
    """CREATE VIEW current_items AS
       SELECT v.* FROM item_versions v
       JOIN current_plans p USING (stage, item_id, item_key)""",
    """CREATE VIEW failures AS
       SELECT run_id, stage, item_id, item_key, error_kind, error_message, retryable, attempt,
              created_at
       FROM items WHERE status = 'failed'""",
    """CREATE VIEW current_failures AS
       SELECT run_id, stage, item_id, item_key, error_kind, error_message, retryable, attempt,
              created_at
       FROM current_items WHERE status = 'failed'""",
    """CREATE VIEW artifact_versions AS
       SELECT * FROM artifacts
       QUALIFY row_number() OVER (PARTITION BY artifact_id ORDER BY created_at DESC) = 1""",
]

_SUMMARY_VIEWS = [
    """CREATE VIEW current_artifacts AS
       SELECT a.* FROM artifact_versions a
       JOIN current_items c ON list_contains(c.artifact_ids, a.artifact_id)""",
    """CREATE VIEW dataset_summary AS
       SELECT dataset, count(*) AS clips, round(sum(duration_s) / 3600, 4) AS hours,
              round(avg(duration_s), 2) AS mean_duration_s, min(fps) AS min_fps,
              max(fps) AS max_fps
       FROM current_clips GROUP BY dataset ORDER BY dataset""",
    """CREATE VIEW current_datasets AS
       SELECT * FROM datasets
       QUALIFY row_number() OVER (PARTITION BY dataset ORDER BY ingested_at DESC) = 1""",
    """CREATE VIEW current_manifest AS
       SELECT m.* FROM manifest m JOIN current_datasets d USING (ingest_id, dataset)""",
    """CREATE VIEW manifest_summary AS
       SELECT m.dataset, any_value(d.licence) AS licence,
              count(*) FILTER (WHERE m.status = 'ok') AS clips,
              count(*) FILTER (WHERE m.status <> 'ok') AS bad_rows,
              round(sum(m.duration_s) / 3600, 3) AS hours,
              count(DISTINCT m.source_id) AS source_videos,
              count(DISTINCT nullif(m.speaker, '')) AS speakers,
              count(DISTINCT nullif(m.language, '')) AS languages
       FROM current_manifest m JOIN current_datasets d USING (ingest_id, dataset)
       GROUP BY m.dataset ORDER BY m.dataset""",
    """CREATE VIEW clip_progress AS
       SELECT m.dataset, m.clip_id, m.source_id, m.duration_s,
              CASE WHEN m.status <> 'ok' THEN 'bad_metadata'
                   ELSE coalesce(i.status, 'pending') END AS download_status,
              coalesce(i.error_kind, m.error_kind) AS error_kind,
              coalesce(i.error_message, m.error_message) AS error_message
       FROM current_manifest m
       LEFT JOIN current_items i ON i.stage = 'download' AND i.item_id = m.clip_id""",
    """CREATE VIEW quality_rules AS
       WITH q AS (
         SELECT q.*, coalesce(c.dataset, '') AS dataset,
                count(*) FILTER (WHERE q.hard AND NOT q.passed)
                  OVER (PARTITION BY q.item_id) AS hard_fails
         FROM current_quality q LEFT JOIN current_clips c USING (item_id))
       SELECT dataset, rule, bool_or(hard) AS hard, count(*) AS clips,
              count(*) FILTER (WHERE NOT passed) AS failed,
              round(100.0 * count(*) FILTER (WHERE NOT passed) / count(*), 1) AS failed_pct,
              count(*) FILTER (WHERE NOT passed AND hard) AS removed,
              count(*) FILTER (WHERE NOT passed AND hard AND hard_fails = 1) AS removed_only_here,
              any_value(threshold) AS threshold, round(avg(value), 3) AS mean_value,
              min(value) AS min, quantile_cont(value, 0.1) AS p10, median(value) AS p50,
              quantile_cont(value, 0.9) AS p90, max(value) AS max,
              CASE WHEN count(*) FILTER (WHERE NOT passed) = count(*) THEN 'fails EVERY clip'
                   WHEN count(*) FILTER (WHERE NOT passed) = 0 THEN 'fails no clip'
                   ELSE '' END AS attention
       FROM q GROUP BY dataset, rule ORDER BY dataset, rule""",
    """CREATE VIEW quality_summary AS
       SELECT dataset, rule, clips, failed, mean_value, min AS min_value, max AS max_value,
              threshold
       FROM quality_rules""",
    """CREATE VIEW eval_summary AS
       SELECT metric, count(*) AS clips, avg(value) AS mean, min(value) AS min,
              max(value) AS max
       FROM current_eval_metrics GROUP BY metric ORDER BY metric""",
]
