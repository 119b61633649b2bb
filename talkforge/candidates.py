"""What a stage should hold: its candidate items, their key material and their inputs.

A source stage's candidates come from its manifests (recorded in the catalog first); any
other stage's from the current ``done`` outputs of the stages it requires, intersected
per item, plus the shared outputs of aggregate upstream stages. The engine turns the key
material into item keys and decides, per key, whether an item runs or is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa

from storage.catalog import Catalog
from talkforge.manifests import source_candidates
from talkforge.plan import RunOptions, StagePlan
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


@dataclass(frozen=True)
class Candidate:
    """An item a stage should hold: its id, its key material, and how to build its inputs.

    ``inputs`` is called only for items that will run: a plan of 188 k cached items
    parses no upstream record at all.
    """

    item_id: str
    keys: Any
    inputs: Callable[[], ItemInputs | AggregateInputs]


def plan_candidates(
    catalog: Catalog,
    stage_cls: type[Stage[Any]],
    cfg: Any,
    env: StageEnv,
    plan: StagePlan,
    options: RunOptions,
    *,
    record: bool = True,
) -> list[Candidate]:
    """Every item this stage should hold, in item-id order.

    Queries: one for the current ``done`` outputs of the required stages (a source stage:
    see :func:`talkforge.manifests.source_candidates`), however many items. ``record=False``
    (a dry run) writes nothing.
    """
    if issubclass(stage_cls, SourceStage):
        return source_candidates(catalog, stage_cls, cfg, env, plan, options, record=record)
    per_item = [s for s in stage_cls.requires if not STAGES[s].aggregate]
    aggregates = [s for s in stage_cls.requires if STAGES[s].aggregate]
    upstream = current_done(catalog, stage_cls.requires)
    shared: dict[str, Record] = {}
    shared_keys: dict[str, str] = {}
    for name in aggregates:
        found_agg = upstream.get(name, {}).get(name)
        if found_agg is None:
            plan.blocked_reason = f"upstream stage {name!r} has no current output"
            return []
        shared_keys[name] = found_agg.key
        shared[name] = found_agg.record()
    for name, prior in stage_cls(cfg, env).prior_outputs().items():
        found_prior = latest_done(catalog, prior)
        if found_prior is None:
            plan.blocked_reason = f"no committed {prior.describe()} to start from ({name})"
            return []
        shared_keys[name], shared[name] = found_prior
    for name in stage_cls.history_of:
        history = committed_history(catalog, name)
        if not history.versions:
            plan.blocked_reason = f"upstream stage {name!r} has no committed output"
            return []
        shared_keys[f"{name}@history"] = stable_hash([v.item_key for v in history.versions])
        shared[f"{name}@history"] = history
    ids = sorted(
        set.intersection(*(set(upstream.get(s, {})) for s in per_item)) if per_item else set()
    )
    stage = stage_cls(cfg, env)
    ids = [i for i in ids if stage.accepts(i, shared)]
    ids = ids[: options.limit] if options.limit else ids
    partner = stage.partners(ids) if stage_cls.partner_inputs else {}
    keys = [
        {
            **{s: upstream[s][i].key for s in per_item},
            **shared_keys,
            **{f"{s}@partner": upstream[s][partner[i]].key for s in stage_cls.partner_inputs
               if i in partner},
        }
        for i in ids
    ]  # fmt: skip

    def item_inputs(item_id: str) -> ItemInputs:
        records = {s: upstream[s][item_id].record() for s in per_item}
        if item_id in partner:
            for s in stage_cls.partner_inputs:
                records[f"{s}@partner"] = upstream[s][partner[item_id]].record()
        return ItemInputs.model_construct(item_id=item_id, records=records, shared=shared)

    if not stage_cls.aggregate:
        return [Candidate(i, k, partial(item_inputs, i)) for i, k in zip(ids, keys, strict=True)]
    if not ids:
        plan.blocked_reason = "no accepted upstream items"
        return []

    def aggregate_inputs() -> AggregateInputs:
        items = [item_inputs(i) for i in ids]
        return AggregateInputs(item_id=stage_cls.name, items=items, shared=shared)

    agg_keys = {"items": dict(zip(ids, keys, strict=True))}
    return [Candidate(stage_cls.name, agg_keys, aggregate_inputs)]


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
    """The records behind one stage's current outputs, fetched in one query the first time
    one is needed — never, for a plan in which every item is cached.

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
    if not stages:
        return {}
    keys: dict[str, dict[str, str]] = {}
    for stage in stages:  # `stage = ?` reaches the views' window partitions; IN (...) not
        rows = catalog.query(
            "SELECT item_id, item_key FROM current_items WHERE status = 'done' AND stage = ?",
            [stage],
        )
        ids, item_keys = rows.column("item_id").to_pylist(), rows.column("item_key").to_pylist()
        keys[stage] = dict(zip(ids, item_keys, strict=True))
    out = {}
    for stage, by_id in keys.items():
        records = Records(catalog, stage, by_id)
        out[stage] = {i: Output(k, i, records) for i, k in by_id.items()}
    return out
