"""What a stage should hold: its candidate items, their key material and their inputs.

A source stage's candidates come from its manifests (recorded in the catalog first); any
other stage's from the current ``done`` outputs of the stages it requires, intersected
per item, plus the shared outputs of aggregate upstream stages. The engine turns the key
material into item keys and decides, per key, whether an item runs or is cached.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from storage.catalog import Catalog
from talkforge.manifests import record_hash, record_manifests
from talkforge.plan import RunOptions, StagePlan
from talkforge.stages import STAGES
from tasks.base import (
    AggregateInputs,
    ItemInputs,
    Record,
    SourceStage,
    Stage,
    StageEnv,
)
from tasks.records import record_from_json


def plan_candidates(
    catalog: Catalog,
    stage_cls: type[Stage[Any]],
    cfg: Any,
    env: StageEnv,
    plan: StagePlan,
    options: RunOptions,
    *,
    record: bool = True,
) -> list[tuple[str, Any, Any]]:
    """(item_id, key material, inputs) for every item this stage should hold.

    Queries: one for the current ``done`` outputs of the required stages (plus, for a
    source stage, one for the current ingests and one commit per changed manifest), however
    many items. ``record=False`` (a dry run) writes nothing.
    """
    if issubclass(stage_cls, SourceStage):
        manifests = stage_cls.read_manifests(cfg, env)
        hashes = {m.dataset: [record_hash(r) for r in m.records] for m in manifests}
        if record:
            record_manifests(catalog, manifests, env.run_id, hashes)
        hash_of = {
            id(r): h for m in manifests for r, h in zip(m.records, hashes[m.dataset], strict=True)
        }
        records, problems = stage_cls.discover(manifests)
        plan.discovery_failures = problems
        found = sorted(((r.clip_id, r) for r in records), key=lambda t: t[0])
        found = found[: options.limit] if options.limit else found
        return [
            (cid, {"source": hash_of[id(r)]}, ItemInputs(item_id=cid, source=r)) for cid, r in found
        ]
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
        shared_keys[name], shared[name] = found_agg
    ids = sorted(
        set.intersection(*(set(upstream.get(s, {})) for s in per_item)) if per_item else set()
    )
    stage = stage_cls(cfg, env)
    ids = [i for i in ids if stage.accepts(i, shared)]
    ids = ids[: options.limit] if options.limit else ids
    items = [
        ItemInputs(item_id=i, records={s: upstream[s][i][1] for s in per_item}, shared=shared)
        for i in ids
    ]
    keys = [{**{s: upstream[s][i][0] for s in per_item}, **shared_keys} for i in ids]
    if not stage_cls.aggregate:
        return [(i, k, inp) for i, k, inp in zip(ids, keys, items, strict=True)]
    if not items:
        plan.blocked_reason = "no accepted upstream items"
        return []
    agg_keys = {"items": {i: k for i, k in zip(ids, keys, strict=True)}}
    return [
        (
            stage_cls.name,
            agg_keys,
            AggregateInputs(item_id=stage_cls.name, items=items, shared=shared),
        )
    ]


def current_done(
    catalog: Catalog, stages: tuple[str, ...]
) -> dict[str, dict[str, tuple[str, Record]]]:
    """stage -> item id -> (item key, record) of the current ``done`` outputs of ``stages``."""
    if not stages:
        return {}
    placeholders = ", ".join("?" for _ in stages)
    sql = (
        "SELECT stage, item_id, item_key, record_type, record_json FROM current_items "  # noqa: S608 - placeholders only
        "WHERE status = 'done' AND stage IN (" + placeholders + ")"
    )
    rows = catalog.query(sql, list(stages)).to_pylist()
    out: dict[str, dict[str, tuple[str, Record]]] = defaultdict(dict)
    for r in rows:
        out[r["stage"]][r["item_id"]] = (
            r["item_key"],
            record_from_json(r["record_type"], r["record_json"]),
        )
    return out
