"""The SQL views every catalog connection defines over the DuckLake tables.

Tables are attached as ``lake.<table>``; each gets a same-named view so queries (the
engine's, ops engineers', dashboards') name ``items``, ``clips``, ... exactly as before.
Views are connection-local (in duckdb's in-memory database), never stored in the lake, so
a time-travel connection (attached at an old snapshot) gets the same views over old data.
"""

from __future__ import annotations

from storage.schema import ALL_TABLES, STATS_TABLES


def view_statements() -> list[str]:
    """Every CREATE VIEW, in dependency order."""
    tables = [
        f"CREATE VIEW {t} AS SELECT * FROM lake.{t}"  # noqa: S608 - names from storage.schema
        for t in ALL_TABLES
    ]
    stats = [
        f"CREATE VIEW current_{t} AS SELECT s.* FROM {t} s "  # noqa: S608
        "JOIN current_items c ON s.stage = c.stage AND s.item_id = c.item_id "
        "AND s.item_key = c.item_key AND s.run_id = c.run_id"
        for t in STATS_TABLES
    ]
    return [*tables, *_VIEWS, *stats, *_SUMMARY_VIEWS]


_VIEWS = [
    """CREATE VIEW current_leases AS
       SELECT * FROM leases a
       WHERE event = 'acquired' AND NOT EXISTS (
         SELECT 1 FROM leases r WHERE r.event = 'released' AND r.lease_id = a.lease_id)""",
    """CREATE VIEW run_snapshots AS
       SELECT commit_message AS run_id, min(snapshot_id) AS first_snapshot,
              max(snapshot_id) AS last_snapshot, min(snapshot_time) AS first_at,
              max(snapshot_time) AS last_at, count(*) AS commits
       FROM lake.snapshots() WHERE author = 'talkforge' AND coalesce(commit_message, '') <> ''
       GROUP BY commit_message""",
    """CREATE VIEW runs_latest AS
       SELECT * FROM runs
       QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY event_at DESC) = 1""",
    """CREATE VIEW item_versions AS
       SELECT * FROM items
       QUALIFY row_number() OVER (
         PARTITION BY stage, item_id, item_key ORDER BY created_at DESC, attempt DESC) = 1""",
    # a complete plan (no --limit) that listed every item its stage holds makes older rows
    # irrelevant: only rows since the stage's latest such plan are ranked. Later plans list
    # only what changed (and drop what left), so the newest row per item is current.
    # (stage_runs rows written before lists_all existed listed everything.)
    """CREATE VIEW current_plans AS
       WITH since AS (SELECT stage, max(planned_at) AS planned_at FROM stage_runs
                      WHERE complete AND coalesce(lists_all, true) GROUP BY stage)
       SELECT p.* FROM plans p LEFT JOIN since s ON s.stage = p.stage
       WHERE s.planned_at IS NULL OR p.planned_at >= s.planned_at
       QUALIFY row_number() OVER (PARTITION BY p.stage, p.item_id
                                  ORDER BY p.planned_at DESC) = 1""",
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
                -- rows written before the measured column: the reason tells
                NOT coalesce(q.measured, NOT starts_with(q.reason, 'unmeasured')) AS unmeasured,
                count(*) FILTER (WHERE q.hard AND NOT q.passed)
                  OVER (PARTITION BY q.item_id) AS hard_fails
         FROM current_quality q LEFT JOIN current_clips c USING (item_id))
       SELECT dataset, rule, bool_or(hard) AS hard, count(*) AS clips,
              count(*) FILTER (WHERE passed AND NOT unmeasured) AS passed,
              count(*) FILTER (WHERE NOT passed) AS failed,
              round(100.0 * count(*) FILTER (WHERE NOT passed) / count(*), 1) AS failed_pct,
              count(*) FILTER (WHERE unmeasured) AS unmeasured,
              count(*) FILTER (WHERE NOT passed AND hard) AS removed,
              count(*) FILTER (WHERE NOT passed AND hard AND hard_fails = 1) AS removed_only_here,
              any_value(threshold) AS threshold, round(avg(value), 3) AS mean_value,
              min(value) AS min, quantile_cont(value, 0.1) AS p10, median(value) AS p50,
              quantile_cont(value, 0.9) AS p90, max(value) AS max,
              CASE WHEN count(*) FILTER (WHERE NOT passed) = count(*) THEN 'fails EVERY clip'
                   WHEN count(*) FILTER (WHERE unmeasured) = count(*)
                     THEN 'unmeasured on EVERY clip'
                   WHEN count(*) FILTER (WHERE NOT passed) = 0 THEN 'fails no clip'
                   ELSE '' END AS attention
       FROM q GROUP BY dataset, rule ORDER BY dataset, rule""",
    """CREATE VIEW quality_summary AS
       SELECT dataset, rule, clips, passed, failed, unmeasured, mean_value, min AS min_value,
              max AS max_value, threshold
       FROM quality_rules""",
    """CREATE VIEW current_split AS
       SELECT * FROM splits
       WHERE planned_at = (SELECT max(planned_at) FROM splits)""",
]
