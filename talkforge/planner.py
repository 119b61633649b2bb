"""Deciding every item of a stage inside the catalog: keys, states, changes and drops in SQL.

A stage's candidates (:mod:`talkforge.candidates`) arrive as a relation with each item's
key material in columns. One read session on one snapshot then, in duckdb:

1. keys every item — ``sha256(head || {"<name>":"<value>",...} || tail)``, the same bytes
   :func:`tasks.base.stable_hash` hashes (:func:`talkforge.plan.key_frame`); a value the
   concatenation cannot spell as JSON (a quote, a backslash, a non-ASCII character) is
   keyed in Python instead, so keys never depend on where they were computed;
2. joins each key's latest state (``items``) and each item's current key
   (``current_plans``) and decides its action (run / cached / skip_failed);
3. returns the counts, the *listed* items — those that run or whose key differs from the
   current one — and the current items the plan no longer holds (dropped).

Only listed items become Python objects, and only they are written to ``plans``; the
counts go to ``stage_runs``. A re-run with nothing to do therefore moves a few numbers,
not 200 k rows: that is what keeps a no-op plan of a 200 k-item stage under a second or
two. Trade-off: ``plans`` no longer lists every item of every run — a run's full picture
is ``stage_runs`` (counts) plus its listed rows, and "current" is the newest row per item
since the stage's last plan that listed everything (see ``current_plans``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from storage.catalog import Catalog
from talkforge.candidates import Candidates
from talkforge.plan import PlannedItem, RunOptions, StagePlan, canonical_json, key_frame, key_hasher
from tasks.base import stable_hash

CANDIDATES = "_plan_candidates"
ITEMS = "_plan_items"
CURRENT = "_plan_current"
DECIDED = "_plan_decided"
# printable ASCII but the quote and the backslash: spelled as JSON exactly as it is
_PLAIN = r"[\x20-\x21\x23-\x5b\x5d-\x7e]*"

_DECIDE = f"""
CREATE OR REPLACE TEMP TABLE {DECIDED} AS
WITH state AS (
  SELECT item_key, arg_max(status, created_at) AS status,
         arg_max(retryable, created_at) AS retryable, count(*) AS attempts
  FROM items SEMI JOIN {ITEMS} USING (item_key) WHERE stage = $stage GROUP BY item_key),
decided AS (
  SELECT p.*, s.status, coalesce(s.attempts, 0) AS attempts, c.item_key AS current_key,
         CASE WHEN p.rejected THEN 'skip_failed'
              WHEN s.status IN ('done', 'filtered') THEN 'cached'
              WHEN s.status = 'failed' AND NOT $retry_failed
                   AND (NOT coalesce(s.retryable, false) OR s.attempts >= $max_attempts)
                THEN 'skip_failed'
              ELSE 'run' END AS action
  FROM {ITEMS} p LEFT JOIN state s USING (item_key) LEFT JOIN {CURRENT} c USING (item_id))
SELECT *, action = 'run' OR current_key IS DISTINCT FROM item_key AS listed FROM decided
"""  # noqa: S608 - table names are constants

_COUNTS = f"""
SELECT count(*) FILTER (WHERE action = 'run') AS run,
       count(*) FILTER (WHERE action = 'cached') AS cached,
       count(*) FILTER (WHERE action = 'skip_failed') AS skip_failed,
       count(*) FILTER (WHERE action = 'cached' AND status = 'filtered') AS cached_filtered,
       count(*) FILTER (WHERE action = 'run' AND attempts > 0) AS retried
FROM {DECIDED}
"""  # noqa: S608

_DROPPED = f"""
SELECT item_id FROM {CURRENT} ANTI JOIN {ITEMS} USING (item_id)
WHERE item_key <> '' ORDER BY item_id
"""  # noqa: S608

# the stage's latest plan, and how many item rows the stage has now
_LAST = """
SELECT (SELECT count(*) FROM items WHERE stage = $stage) AS item_rows, s.*
FROM (SELECT 1) LEFT JOIN (SELECT * FROM stage_runs WHERE stage = $stage
                           ORDER BY planned_at DESC LIMIT 1) s ON true
"""


@dataclass(frozen=True)
class Rejected:
    """A manifest row that cannot become an item, keyed by its raw id and message."""

    item_id: str
    failure: Any
    item_key: str


def decide(
    catalog: Catalog,
    candidates: Candidates,
    plan: StagePlan,
    common: dict[str, Any],
    rejected: list[Rejected],
    options: RunOptions,
    max_attempts: int,
) -> list[Rejected]:
    """Fill ``plan`` (listed items, counts, dropped, digest) in one catalog session;
    returns the rejected rows never recorded before (their failures are to be committed).

    **Nothing changed, nothing to do.** The plan's inputs — every candidate's id and key
    material, the rejected rows, the stage version, the options — are summarised by a
    digest computed in SQL (64-bit ``hash`` per row, summed and xor-ed: a change going
    unnoticed would take a double 64-bit collision). When it equals the digest of the
    stage's latest plan, that plan was complete and ran nothing, and not one ``items`` row
    of the stage was written since, this plan is that plan again: its counts are reused
    and nothing is keyed, looked up or listed.
    """
    keyed = dict(candidates.keyed)
    hasher = key_hasher(common)
    prekeyed = pa.table(
        {
            "item_id": pa.array([*keyed, *(r.item_id for r in rejected)], pa.string()),
            "item_key": pa.array(
                [*(hasher(m) for m in keyed.values()), *(r.item_key for r in rejected)],
                pa.string(),
            ),
            "rejected": pa.array([False] * len(keyed) + [True] * len(rejected), pa.bool_()),
        }
    )
    width = len(candidates.columns)
    settings = [common, candidates.constants, candidates.columns, options.retry_failed]
    settings += [options.limit, max_attempts]

    def session(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, Any], pa.Table, list[str]]:
        material = "".join(f", m_{i}" for i in range(width))
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {CANDIDATES} AS "
            + (candidates.sql or f"SELECT NULL::VARCHAR AS item_id{material} LIMIT 0"),
            candidates.params,
        )
        try:
            plan.digest = stable_hash([*settings, *(_digest(con, t) for t in _DIGESTED)])
            last = con.execute(_LAST, {"stage": plan.stage}).to_arrow_table().to_pylist()[0]
            plan.item_rows = last["item_rows"]
            if options.limit is None and _unchanged(last, plan.digest):
                return last, pa.table({}), []
            return _decide(con, candidates, hasher, common, plan.stage, params)
        finally:
            for table in (DECIDED, CURRENT, ITEMS, CANDIDATES):
                con.execute(f"DROP TABLE IF EXISTS {table}")

    params = {"retry_failed": options.retry_failed, "max_attempts": max_attempts}
    counts, listed, dropped = catalog.read(
        session, tables={**candidates.tables, "_prekeyed": prekeyed}
    )
    plan.dropped = dropped if options.limit is None else []  # a partial plan drops nothing
    if not listed.num_columns:  # the latest plan again
        counts = {
            "run": 0,
            "cached": counts["cached_done"] + counts["cached_filtered"],
            "skip_failed": counts["skip_failed"],
            "cached_filtered": counts["cached_filtered"],
            "retried": 0,
        }
    plan.counts.update({a: counts[a] for a in ("run", "cached", "skip_failed") if counts[a]})
    plan.cached_filtered, plan.retried = counts["cached_filtered"], counts["retried"]
    rows = listed.to_pylist()
    fresh = [r for r in rows if r["rejected"] and r["status"] is None]
    plan.item_rows += len(fresh)  # committed with the plan
    rows = [r for r in rows if r["listed"]]

    def material(row: dict[str, Any]) -> dict[str, Any]:
        if row["rejected"]:
            return {}
        return keyed[row["item_id"]] if row["item_id"] in keyed else candidates.material(row)

    plan.build_inputs = candidates.build
    plan.items = [
        PlannedItem(r["item_id"], r["item_key"], r["action"], r["attempts"] + 1, material(r))
        for r in rows
    ]
    by_id = {r.item_id: r for r in rejected}
    return [by_id[r["item_id"]] for r in fresh]


_DIGESTED = (CANDIDATES, "_prekeyed")


def _digest(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    columns = [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall()]
    row = con.execute(
        f"SELECT count(*), sum(hash({', '.join(columns)}))::VARCHAR, "  # noqa: S608
        f"bit_xor(hash({', '.join(columns)}))::VARCHAR FROM {table}"
    ).fetchone()
    return [str(v) for v in row or ()]


def _unchanged(last: dict[str, Any], digest: str) -> bool:
    """Whether the stage's latest plan was this same plan, complete, with nothing to run,
    and no item row of the stage came after it (its counts still hold)."""
    return (
        last.get("inputs_digest") == digest
        and bool(last.get("complete"))
        and last.get("to_run") == 0
        and last.get("stage_item_rows") == last["item_rows"]
    )


def _decide(
    con: duckdb.DuckDBPyConnection,
    candidates: Candidates,
    hasher: Any,
    common: dict[str, Any],
    stage: str,
    params: dict[str, Any],
) -> tuple[dict[str, Any], pa.Table, list[str]]:
    """Key, look up and decide every item (the temp tables are dropped by the caller)."""
    parts = ["SELECT item_id, item_key, true AS plain, rejected FROM _prekeyed"]
    if candidates.sql:
        parts.insert(0, _keyed_sql(candidates, common))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {ITEMS} AS " + " UNION ALL BY NAME ".join(parts))
    _key_odd_ones(con, candidates, hasher)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {CURRENT} AS SELECT item_id, item_key "  # noqa: S608
        "FROM current_plans WHERE stage = $stage",
        {"stage": stage},
    )
    con.execute(_DECIDE, {**params, "stage": stage})
    counts = con.execute(_COUNTS).to_arrow_table().to_pylist()[0]
    listed = con.execute(
        f"SELECT * FROM {DECIDED} WHERE listed OR (rejected AND status IS NULL) "  # noqa: S608
        "ORDER BY item_id"
    ).to_arrow_table()
    dropped = [r[0] for r in con.execute(_DROPPED).fetchall()]
    return counts, listed, dropped


def _keyed_sql(candidates: Candidates, common: dict[str, Any]) -> str:
    """The candidates with ``item_key`` computed in SQL and ``plain`` (spelled exactly)."""
    head, tail = key_frame(common)
    columns, constants = candidates.columns, candidates.constants
    if set(columns) & set(constants):
        raise ValueError(f"key material named twice: {sorted(set(columns) & set(constants))}")
    pieces = []
    for name in sorted([*columns, *constants]):
        label = canonical_json(name) + ":"
        if name in constants:
            pieces.append(_literal(label + canonical_json(constants[name])))
        else:
            pieces.append(f"{_literal(label + chr(34))} || m_{columns.index(name)} || '\"'")
    body = f"concat_ws(',', {', '.join(pieces)})" if pieces else "''"
    key = f"sha256({_literal(head)} || '{{' || {body} || '}}' || {_literal(tail)})"
    plain = " AND ".join(
        f"coalesce(regexp_full_match(m_{i}, '{_PLAIN}'), true)" for i in range(len(columns))
    )
    material = "".join(f", m_{i}" for i in range(len(columns)))
    return (
        f"SELECT item_id, {key} AS item_key, {plain or 'true'} AS plain, false AS rejected"  # noqa: S608
        f"{material} FROM {CANDIDATES}"
    )


def _key_odd_ones(con: duckdb.DuckDBPyConnection, candidates: Candidates, hasher: Any) -> None:
    """Key in Python the (normally no) items whose material SQL could not spell as JSON."""
    odd = con.execute(f"SELECT * FROM {ITEMS} WHERE NOT plain").to_arrow_table().to_pylist()  # noqa: S608
    if not odd:
        return
    fixed = pa.table(
        {
            "item_id": pa.array([r["item_id"] for r in odd], pa.string()),
            "item_key": pa.array([hasher(candidates.material(r)) for r in odd], pa.string()),
        }
    )
    con.register("_fixed_keys", fixed)
    try:
        con.execute(
            f"UPDATE {ITEMS} SET item_key = f.item_key, plain = true FROM _fixed_keys f "  # noqa: S608
            f"WHERE {ITEMS}.item_id = f.item_id AND NOT {ITEMS}.plain"
        )
    finally:
        con.unregister("_fixed_keys")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
