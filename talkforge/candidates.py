"""What a stage should hold: its candidate items, their key material and their inputs.

A source stage's candidates come from its manifests (recorded in the catalog first); any
other stage's from the current ``done`` outputs of the stages it requires, intersected
per item, plus the shared outputs of aggregate upstream stages. Candidates are a SQL
relation, not Python objects: one row per item with its per-item key material (upstream
item keys) as columns, so :mod:`talkforge.planner` keys and decides a 188 k-item stage
inside duckdb and only the items that run ever become Python objects, a shard at a time
(:meth:`talkforge.plan.StagePlan.inputs_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from storage.catalog import Catalog
from talkforge.manifests import source_candidates
from talkforge.plan import Inputs, InputsBuilder, RunOptions, StagePlan
from talkforge.stages import STAGES
from tasks.base import (
    AggregateInputs,
    ItemInputs,
    PriorOutput,
    Record,
    SourceStage,
    Stage,
    StageEnv,
    stable_hash,
)
from tasks.records import CommittedHistory, CommittedVersion, record_from_json


@dataclass
class Candidates:
    """Every item a stage should hold, as a relation the planner keys in SQL.

    ``sql`` selects ``item_id`` and a column ``m_<i>`` per name of ``columns`` (that item's
    key material under that name; NULL leaves the name out of its key), ordered by item id,
    over ``tables`` (arrow tables it names) with ``params``. ``constants`` is the material
    every item shares. An item's key material is ``{columns..., constants...}``, exactly
    the dict :func:`talkforge.plan.key_hasher` hashes. ``keyed`` lists items keyed in
    Python instead (an aggregate stage's one item: its material nests every upstream key).
    ``build`` makes the inputs of the items that run.
    """

    build: InputsBuilder
    sql: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    keyed: list[tuple[str, Any]] = field(default_factory=list)

    def material(self, row: dict[str, Any]) -> dict[str, Any]:
        """One item's key material from its ``m_<i>`` columns."""
        found = {n: row[f"m_{i}"] for i, n in enumerate(self.columns) if row[f"m_{i}"] is not None}
        return {**found, **self.constants}


def no_candidates() -> Candidates:
    return Candidates(build=lambda rows: {})


def plan_candidates(
    catalog: Catalog,
    stage_cls: type[Stage[Any]],
    cfg: Any,
    env: StageEnv,
    plan: StagePlan,
    options: RunOptions,
    *,
    record: bool = True,
) -> Candidates:
    """Every item this stage should hold (see :class:`Candidates`).

    Queries: a constant number, however many items (a source stage: see
    :func:`talkforge.manifests.source_candidates`). A stage that filters items
    (``accepts``) or pairs them (``partners``) gets their ids first, one more query.
    ``record=False`` (a dry run) writes nothing.
    """
    if issubclass(stage_cls, SourceStage):
        return source_candidates(catalog, stage_cls, cfg, env, plan, options, record=record)
    per_item = [s for s in stage_cls.requires if not STAGES[s].aggregate]
    aggregates = [s for s in stage_cls.requires if STAGES[s].aggregate]
    shared: dict[str, Record] = {}
    shared_keys: dict[str, str] = {}
    found_aggregates = current_done(catalog, tuple(aggregates))
    for name in aggregates:
        found_agg = found_aggregates.get(name, {}).get(name)
        if found_agg is None:
            plan.blocked_reason = f"upstream stage {name!r} has no current output"
            return no_candidates()
        shared_keys[name] = found_agg.key
        shared[name] = found_agg.record()
    stage = stage_cls(cfg, env)
    for name, prior in stage.prior_outputs().items():
        found_prior = latest_done(catalog, prior)
        if found_prior is None:
            plan.blocked_reason = f"no committed {prior.describe()} to start from ({name})"
            return no_candidates()
        shared_keys[name], shared[name] = found_prior
    for name in stage_cls.history_of:
        history = committed_history(catalog, name)
        if not history.versions:
            plan.blocked_reason = f"upstream stage {name!r} has no committed output"
            return no_candidates()
        shared_keys[f"{name}@history"] = stable_hash([v.item_key for v in history.versions])
        shared[f"{name}@history"] = history
    if not per_item:
        return no_candidates()
    if stage_cls.aggregate:
        return _aggregate(catalog, stage, per_item, shared, shared_keys, options, plan)
    return _per_item(catalog, stage, per_item, shared, shared_keys, options)


def _upstream_sql(stages: list[str]) -> tuple[str, dict[str, Any]]:
    """``item_id, u_<i>`` of the items every stage of ``stages`` holds as current ``done``.

    Only positional column names are formatted in; stage names travel as parameters
    (`stage = $stage_i`, not IN (...): it reaches the views' window partitions).
    """
    params = {f"stage_{i}": name for i, name in enumerate(stages)}
    parts = [
        f"(SELECT item_id, item_key AS u_{i} FROM current_items "  # noqa: S608
        f"WHERE status = 'done' AND stage = $stage_{i}) AS s_{i}"
        for i in range(len(stages))
    ]
    joined = " JOIN ".join([parts[0], *(f"{p} USING (item_id)" for p in parts[1:])])
    return f"SELECT * FROM {joined}", params  # noqa: S608


def _filters(stage: Stage[Any]) -> bool:
    """Whether ``stage`` overrides ``accepts`` or pairs items (Python decides per item)."""
    return type(stage).accepts is not Stage.accepts or bool(stage.partner_inputs)


def _per_item(
    catalog: Catalog,
    stage: Stage[Any],
    per_item: list[str],
    shared: dict[str, Record],
    shared_keys: dict[str, str],
    options: RunOptions,
) -> Candidates:
    upstream, params = _upstream_sql(per_item)
    columns = list(per_item)
    select = ", ".join(f"u.u_{i} AS m_{i}" for i in range(len(per_item)))
    tables: dict[str, pa.Table] = {}
    partner: dict[str, str] = {}
    if _filters(stage):
        ids = catalog.query(f"SELECT item_id FROM ({upstream}) ORDER BY item_id", params)  # noqa: S608
        accepted = [i for i in ids.column("item_id").to_pylist() if stage.accepts(i, shared)]
        accepted = accepted[: options.limit] if options.limit else accepted
        partner = stage.partners(accepted) if stage.partner_inputs else {}
        tables["accepted"] = pa.table(
            {
                "item_id": pa.array(accepted, pa.string()),
                "partner_id": pa.array([partner.get(i) for i in accepted], pa.string()),
            }
        )
        sql = f"SELECT u.item_id, {select}"
        joins = f" FROM ({upstream}) u JOIN accepted a USING (item_id)"
        for j, name in enumerate(stage.partner_inputs):
            i = per_item.index(name)
            columns.append(f"{name}@partner")
            sql += f", p_{j}.u_{i} AS m_{len(columns) - 1}"
            joins += f" LEFT JOIN ({upstream}) p_{j} ON p_{j}.item_id = a.partner_id"
        sql += joins + " ORDER BY u.item_id"
    else:
        sql = f"SELECT u.item_id, {select} FROM ({upstream}) u ORDER BY u.item_id"  # noqa: S608
        if options.limit:
            sql += f" LIMIT {int(options.limit)}"

    def build(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, Inputs]:
        keys: dict[str, dict[str, str]] = {s: {} for s in per_item}
        for item_id, material in rows:
            for s in per_item:
                keys[s][item_id] = material[s]
                if f"{s}@partner" in material:
                    keys[s][partner[item_id]] = material[f"{s}@partner"]
        records = {s: Records(catalog, s, keys[s]) for s in per_item}
        out: dict[str, Inputs] = {}
        for item_id, material in rows:
            found = {s: records[s].get(item_id) for s in per_item}
            for s in stage.partner_inputs:
                if f"{s}@partner" in material:
                    found[f"{s}@partner"] = records[s].get(partner[item_id])
            out[item_id] = ItemInputs.model_construct(item_id=item_id, records=found, shared=shared)
        return out

    return Candidates(
        build=build,
        sql=sql,
        params=params,
        tables=tables,
        columns=columns,
        constants=shared_keys,
    )


def _aggregate(
    catalog: Catalog,
    stage: Stage[Any],
    per_item: list[str],
    shared: dict[str, Record],
    shared_keys: dict[str, str],
    options: RunOptions,
    plan: StagePlan,
) -> Candidates:
    """One item (the stage's name) keyed by every accepted upstream item's keys."""
    upstream = current_done(catalog, tuple(per_item))
    ids = sorted(set.intersection(*(set(upstream.get(s, {})) for s in per_item)))
    ids = [i for i in ids if stage.accepts(i, shared)]
    ids = ids[: options.limit] if options.limit else ids
    if not ids:
        plan.blocked_reason = "no accepted upstream items"
        return no_candidates()
    keys = {i: {**{s: upstream[s][i].key for s in per_item}, **shared_keys} for i in ids}

    def build(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, Inputs]:
        items = [
            ItemInputs.model_construct(
                item_id=i,
                records={s: upstream[s][i].record() for s in per_item},
                shared=shared,
            )
            for i in ids
        ]
        return {stage.name: AggregateInputs(item_id=stage.name, items=items, shared=shared)}

    return Candidates(build=build, keyed=[(stage.name, {"items": keys})])


def latest_done(catalog: Catalog, prior: PriorOutput) -> tuple[str, Record] | None:
    """(item key, record) of the newest ``done`` item of ``prior.stage`` matching ``prior``
    (any run's, current or not: a training stage starts from an earlier stage's output)."""
    rows = catalog.query(
        "SELECT item_key, record_type, record_json FROM items "
        "WHERE stage = ? AND status = 'done' ORDER BY created_at DESC",
        [prior.stage],
    ).to_pylist()
    for r in rows:
        record = record_from_json(r["record_type"], r["record_json"])
        if all(str(getattr(record, k, None)) == v for k, v in prior.match.items()):
            return r["item_key"], record
    return None


def committed_history(catalog: Catalog, stage: str) -> CommittedHistory:
    """Every ``done`` version of ``stage``'s outputs ever committed (any run, current or
    not; a key committed twice counts once), oldest first."""
    rows = catalog.query(
        "SELECT item_key, arg_max(record_type, created_at) AS record_type, "
        "arg_max(record_json, created_at) AS record_json, min(created_at) AS first_at "
        "FROM items WHERE stage = ? AND status = 'done' GROUP BY item_key "
        "ORDER BY first_at, item_key",
        [stage],
    ).to_pylist()
    versions = [
        CommittedVersion(
            item_key=r["item_key"], record_type=r["record_type"], record_json=r["record_json"]
        )
        for r in rows
    ]
    return CommittedHistory(stage=stage, versions=versions)


class Records:
    """The records behind one stage's outputs, fetched in one query the first time one is
    needed — never, for a plan in which every item is cached.

    Rows are looked up by (item id, item key) in ``items``, so a record always belongs to
    the key the plan saw, whatever was committed in between.
    """

    def __init__(self, catalog: Catalog, stage: str, keys: dict[str, str]) -> None:
        self._catalog = catalog
        self._stage = stage
        self._keys = keys
        self._rows: dict[str, tuple[str, str]] | None = None

    def get(self, item_id: str) -> Record:
        if self._rows is None:
            wanted = pa.table(
                {
                    "item_id": pa.array(list(self._keys), pa.string()),
                    "item_key": pa.array(list(self._keys.values()), pa.string()),
                }
            )
            rows = self._catalog.query(
                "SELECT item_id, any_value(record_type) AS record_type, "
                "any_value(record_json) AS record_json FROM items "
                "SEMI JOIN wanted USING (item_id, item_key) WHERE stage = ? AND status = 'done' "
                "GROUP BY item_id",
                [self._stage],
                tables={"wanted": wanted},
            )
            self._rows = {
                i: (t, j)
                for i, t, j in zip(
                    *(rows.column(c).to_pylist() for c in rows.column_names), strict=True
                )
            }
        record_type, record_json = self._rows[item_id]
        return record_from_json(record_type, record_json)


@dataclass(frozen=True)
class Output:
    """A current ``done`` output of an upstream stage; its record is fetched on demand."""

    key: str
    item_id: str
    records: Records

    def record(self) -> Record:
        return self.records.get(self.item_id)


def current_done(catalog: Catalog, stages: tuple[str, ...]) -> dict[str, dict[str, Output]]:
    """stage -> item id -> :class:`Output` of the current ``done`` outputs of ``stages``.

    One query per stage for ids and keys only; a stage's records come later, in one more
    query, if an item that needs them runs (:class:`Records`).
    """
    out = {}
    for stage in stages:  # `stage = ?` reaches the views' window partitions; IN (...) not
        rows = catalog.query(
            "SELECT item_id, item_key FROM current_items WHERE status = 'done' AND stage = ?",
            [stage],
        )
        ids, item_keys = rows.column("item_id").to_pylist(), rows.column("item_key").to_pylist()
        records = Records(catalog, stage, dict(zip(ids, item_keys, strict=True)))
        out[stage] = {i: Output(k, i, records) for i, k in zip(ids, item_keys, strict=True)}
    return out
