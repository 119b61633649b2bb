"""Read-side questions ops engineers ask the catalog: status, failures, lineage, versions.

Each function returns plain rows (list of dicts) so the CLI only formats them and tests
can assert on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.catalog import Catalog
from talkforge.stages import STAGE_ORDER


def latest_run_id(catalog: Catalog) -> str | None:
    rows = catalog.query(
        "SELECT run_id FROM runs WHERE event = 'started' ORDER BY event_at DESC LIMIT 1"
    ).to_pylist()
    return rows[0]["run_id"] if rows else None


def run_info(catalog: Catalog, run_id: str) -> dict[str, Any] | None:
    """The run's start row (config, options) and its last event."""
    start = catalog.query(
        "SELECT * FROM runs WHERE run_id = ? AND event = 'started'", [run_id]
    ).to_pylist()
    if not start:
        return None
    last = catalog.query(
        "SELECT event, message, event_at FROM runs_latest WHERE run_id = ?", [run_id]
    ).to_pylist()[0]
    return {
        **start[0],
        "last_event": last["event"],
        "last_message": last["message"],
        "last_at": last["event_at"],
    }


def list_runs(catalog: Catalog, limit: int = 20) -> list[dict[str, Any]]:
    return catalog.query(
        "SELECT s.run_id, s.event_at AS started_at, l.event AS state, l.event_at AS last_at, "
        "s.stages, s.command, l.message FROM runs s JOIN runs_latest l USING (run_id) "
        "WHERE s.event = 'started' ORDER BY s.event_at DESC LIMIT ?",
        [limit],
    ).to_pylist()


def stage_status(catalog: Catalog, run_id: str) -> list[dict[str, Any]]:
    """Per stage of a run: items planned and how the run left them.

    ``skipped`` counts items the run did not execute because they were already committed
    (cached: counted in ``done``/``filtered``) or failed permanently earlier (counted in
    ``failed``); ``pending`` items have no result from this run (never reached, or the run
    was killed before them); ``dropped`` items left the stage's current view (their
    upstream no longer passes). Stages the run was asked for but never planned (an
    earlier stage crashed) show with zero items.

    Two queries however large the stages: the run's ``stage_runs`` rows (the plan's
    counts) and the run's own item rows, found by run id. What later runs did never
    changes a run's status, so ``--as-of RUN`` shows what this showed when the run ended.
    """
    rows = catalog.query(
        """
        WITH s AS (SELECT * FROM stage_runs WHERE run_id = $run
                   QUALIFY row_number() OVER (PARTITION BY stage ORDER BY planned_at DESC) = 1),
             r AS (SELECT stage, item_id, arg_max(status, created_at) AS status FROM items
                   WHERE run_id = $run AND coalesce(worker, '') <> 'discover'
                   GROUP BY stage, item_id),
             n AS (SELECT stage, count(*) FILTER (WHERE status = 'done') AS done,
                          count(*) FILTER (WHERE status = 'filtered') AS filtered,
                          count(*) FILTER (WHERE status = 'failed') AS failed
                   FROM r GROUP BY stage)
        SELECT s.stage, s.items,
               s.cached_done + coalesce(n.done, 0) AS done,
               s.cached_filtered + coalesce(n.filtered, 0) AS filtered,
               s.skip_failed + coalesce(n.failed, 0) AS failed,
               s.items - s.cached_done - s.cached_filtered - s.skip_failed
                 - coalesce(n.done, 0) - coalesce(n.filtered, 0) - coalesce(n.failed, 0)
                 AS pending,
               s.cached_done + s.cached_filtered + s.skip_failed AS skipped,
               s.dropped
        FROM s LEFT JOIN n USING (stage)
        ORDER BY s.planned_at
        """,
        {"run": run_id},
    ).to_pylist()
    by_stage = {r["stage"]: r for r in rows}
    info = run_info(catalog, run_id)
    asked = list(info["stages"] or []) if info else []  # in pipeline order
    order = asked + [r["stage"] for r in rows if r["stage"] not in asked]
    empty = dict.fromkeys(
        ("items", "done", "filtered", "failed", "pending", "skipped", "dropped"), 0
    )
    return [by_stage.get(s, {"stage": s, **empty}) for s in order]


def failures(
    catalog: Catalog, stage: str | None = None, kind: str | None = None, history: bool = False
) -> list[dict[str, Any]]:
    view = "failures" if history else "current_failures"
    sql = (
        "SELECT stage, item_id, error_kind, retryable, attempt, error_message, run_id FROM "  # noqa: S608 - view is a literal
        + view
        + " WHERE 1 = 1"
    )
    params: list[Any] = []
    if stage:
        sql += " AND stage = ?"
        params.append(stage)
    if kind:
        sql += " AND error_kind = ?"
        params.append(kind)
    sql += " ORDER BY stage, item_id, attempt"
    return catalog.query(sql, params).to_pylist()


def failures_by_kind(catalog: Catalog, stage: str | None = None) -> list[dict[str, Any]]:
    """Current failures grouped by stage and kind, with one example message each."""
    sql = (
        "SELECT stage, error_kind, count(*) AS items, bool_or(retryable) AS retryable, "
        "any_value(error_message) AS example FROM current_failures"
    )
    params: list[Any] = []
    if stage:
        sql += " WHERE stage = ?"
        params.append(stage)
    sql += " GROUP BY stage, error_kind ORDER BY stage, items DESC, error_kind"
    return catalog.query(sql, params).to_pylist()


def lineage(catalog: Catalog, target: str) -> list[dict[str, Any]]:
    """Where an artifact or a clip came from: one row per (stage, artifact), upstream first.

    For an artifact id, follows ``input_artifact_ids`` up to the raw download. For a clip
    id, lists the clip's current item in every stage, with its artifacts, and the
    aggregate items (engram, train) that consumed it.
    """
    arts = catalog.query(
        "SELECT * FROM artifact_versions WHERE artifact_id = ?", [target]
    ).to_pylist()
    if arts:
        return _artifact_chain(catalog, arts[0])
    rows = catalog.query(
        "SELECT c.stage, c.item_id, c.item_key, c.status, c.error_kind, c.input_keys_json, "
        "a.artifact_id, a.kind, a.uri, a.sha256, a.size_bytes "
        "FROM current_items c LEFT JOIN artifact_versions a "
        "ON list_contains(c.artifact_ids, a.artifact_id) "
        "WHERE c.item_id = ? OR contains(c.input_keys_json, ?)",
        [target, json.dumps(target)],
    ).to_pylist()
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["stage"], 99), r["kind"] or ""))


def _artifact_chain(catalog: Catalog, first: dict[str, Any]) -> list[dict[str, Any]]:
    chain, seen, frontier = [], set(), [first]
    while frontier:
        art = frontier.pop()
        if art["artifact_id"] in seen:
            continue
        seen.add(art["artifact_id"])
        chain.append(
            {
                k: art[k]
                for k in (
                    "stage",
                    "item_id",
                    "item_key",
                    "artifact_id",
                    "kind",
                    "uri",
                    "sha256",
                    "size_bytes",
                )
            }
        )
        parents = art["input_artifact_ids"] or []
        if parents:
            placeholders = ", ".join("?" for _ in parents)
            frontier += catalog.query(
                f"SELECT * FROM artifact_versions WHERE artifact_id IN ({placeholders})",  # noqa: S608
                list(parents),
            ).to_pylist()
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(chain, key=lambda r: order.get(r["stage"], 99))


def versions(catalog: Catalog, stage: str) -> list[dict[str, Any]]:
    """Every version of a stage's outputs: code version, config hash, models, counts."""
    rows = catalog.query(
        """
        SELECT i.code_version, i.config_hash, i.model_fingerprints_json AS models,
               count(DISTINCT i.item_id) AS items,
               count(*) FILTER (WHERE i.status = 'done') AS done_rows,
               min(i.created_at) AS first_at, max(i.created_at) AS last_at,
               bool_or(p.item_key IS NOT NULL) AS current
        FROM items i LEFT JOIN current_plans p
          ON p.stage = i.stage AND p.item_id = i.item_id AND p.item_key = i.item_key
        WHERE i.stage = ?
        GROUP BY i.code_version, i.config_hash, i.model_fingerprints_json
        ORDER BY first_at
        """,
        [stage],
    ).to_pylist()
    for row in rows:
        models = json.loads(row["models"] or "{}")
        row["models"] = ", ".join(
            f"{name}={m['sha256'][:12]} ({m['origin']})" for name, m in sorted(models.items())
        )
        row["config_hash"] = row["config_hash"][:12]
    return rows


def ingest(config: Any, run_id: str = "ingest") -> list[Any]:
    """Read every dataset of ``config.download`` and record what changed in the catalog.

    A dataset whose metadata files, settings and reader are unchanged since its current
    ingest is not even parsed (its fingerprint matches).
    """
    from talkforge.manifests import read_sources
    from tasks.base import StageEnv
    from tasks.download.stage import DownloadStage

    env = StageEnv(data_root=str(config.data_root), store_uri=config.store_uri, run_id=run_id)
    sources = DownloadStage.manifest_sources(config.stage("download"), env)
    catalog = Catalog(config.data_root / "catalog", config.catalog)
    manifests, _, results = read_sources(catalog, sources, run_id)
    warnings = {m.dataset: len(m.warnings) for m in manifests}
    order = {m.dataset: i for i, m in enumerate(manifests)}
    return [
        {
            "dataset": r.dataset,
            "clips": r.clips,
            "bad_rows": r.problems,
            "warnings": warnings[r.dataset],
            "hours": round(r.hours, 3),
            "ingest": "new version" if r.written else "unchanged",
            "licence": r.licence,
        }
        for r in sorted(results, key=lambda r: order[r.dataset])
    ]


def report(catalog: Catalog, folder: Path) -> list[tuple[str, list[dict[str, Any]], str]]:
    """Every saved SELECT in ``folder`` (``*.sql``), read-only: ``(name, rows, error)`` each."""
    out = []
    for path in sorted(folder.glob("*.sql")):
        try:
            out.append((path.stem, catalog.query_readonly(path.read_text()).to_pylist(), ""))
        except Exception as exc:  # one broken saved query must not hide the others
            out.append((path.stem, [], f"{type(exc).__name__}: {exc}"))
    return out


def datasets(catalog: Catalog) -> list[dict[str, Any]]:
    """Per dataset: licence, clips, bad rows, hours, sources, speakers, languages."""
    return catalog.query("SELECT * FROM manifest_summary").to_pylist()


def quality_rules(catalog: Catalog, dataset: str | None = None) -> list[dict[str, Any]]:
    """Per dataset and rule: how many clips it failed and removed, and its score spread."""
    sql = "SELECT * FROM quality_rules"
    params: list[Any] = []
    if dataset:
        sql += " WHERE dataset = ?"
        params.append(dataset)
    return catalog.query(sql, params).to_pylist()


def score_histogram(
    catalog: Catalog, rule: str, dataset: str | None = None, bins: int = 10
) -> list[dict[str, Any]]:
    """Equal-width histogram of one rule's measured values; NaN values and values of rules
    that passed unmeasured (an ``av_offset`` best guess) are counted apart as not measurable."""
    import numpy as np

    sql = (
        "SELECT CASE WHEN coalesce(q.measured, true) THEN q.value ELSE 'NaN'::DOUBLE END "
        "AS value, q.threshold FROM current_quality q "
        "LEFT JOIN current_clips c USING (item_id) WHERE q.rule = ?"
    )
    params: list[Any] = [rule]
    if dataset:
        sql += " AND c.dataset = ?"
        params.append(dataset)
    rows = catalog.query(sql, params).to_pylist()
    values = np.array([r["value"] for r in rows if r["value"] is not None], dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return []
    counts, edges = np.histogram(finite, bins=bins)
    threshold = rows[0]["threshold"]
    out = [
        {
            "from": float(lo),
            "to": float(hi),
            "clips": int(n),
            "bar": "#" * round(40 * n / max(counts.max(), 1)),
            "threshold_here": threshold is not None and lo <= threshold <= hi,
        }
        for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
    if finite.size < values.size:
        out.append(
            {
                "from": None,
                "to": None,
                "clips": int(values.size - finite.size),
                "bar": "not measurable",
                "threshold_here": False,
            }
        )
    return out
