"""The catalog rows a batch of item outcomes becomes: stats, artifacts and items.

A record's ``stats_rows()`` fill its stage's stats tables; every artifact and item row
carries what made it (code version, config hash, weights fingerprints) and the upstream
keys the item was planned with (lineage). The engine commits the rows of one batch as one
DuckLake transaction, so they appear together or not at all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from talkforge.plan import PlannedItem, StagePlan, now_utc
from talkforge.planner import Rejected
from tasks.records import record_from_json
from tasks.runner import Outcome

DISCOVERY_WORKER = "discover"  # the worker of failures found while planning (bad manifest rows)


def outcome_rows(
    plan: StagePlan,
    code_version: str,
    config_hash: str,
    by_id: dict[str, PlannedItem],
    outcomes: list[Outcome],
) -> dict[str, list[dict[str, Any]]]:
    """Stats, artifact and item rows of ``outcomes`` of ``plan``'s stage (at ``code_version``
    and ``config_hash``): the engine commits them together, one snapshot. ``by_id``: the
    planned items, whose upstream keys become each item row's lineage."""
    fps_json = json.dumps(
        {k: v.model_dump() for k, v in plan.env.model_fingerprints.items()}, sort_keys=True
    )
    stats: dict[str, list[dict[str, Any]]] = defaultdict(list)
    artifacts: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    created_at = now_utc()
    for o in outcomes:
        base = {
            "run_id": plan.run_id,
            "stage": plan.stage,
            "item_id": o.item_id,
            "item_key": o.item_key,
            "created_at": created_at,
        }
        if o.record_json:
            record = record_from_json(o.record_type, o.record_json)
            for table, rows in record.stats_rows().items():
                stats[table].extend({**base, **row} for row in rows)
        for a in o.artifacts:
            artifacts.append(
                {
                    **base,
                    **a.model_dump(),
                    "code_version": code_version,
                    "config_hash": config_hash,
                    "model_fingerprints_json": fps_json,
                    "input_artifact_ids": o.input_artifact_ids,
                    "status": "committed",
                    "error": "",
                }
            )
        planned = by_id.get(o.item_id)
        items.append(
            {
                **base,
                "status": o.status,
                "error_kind": o.error_kind,
                "error_message": o.error_message,
                "retryable": o.retryable,
                "attempt": o.attempt,
                "record_type": o.record_type,
                "record_json": o.record_json,
                "artifact_ids": [a.artifact_id for a in o.artifacts],
                "input_keys_json": json.dumps(
                    planned.input_keys if planned else {}, sort_keys=True
                ),
                "code_version": code_version,
                "config_hash": config_hash,
                "model_fingerprints_json": fps_json,
                "duration_s": o.duration_s,
                "worker": o.worker,
            }
        )
    return {**stats, "artifacts": artifacts, "items": items}


def discovery_failure(rejected: Rejected) -> Outcome:
    """The permanent failure of a manifest row that cannot become an item."""
    return Outcome(
        item_id=rejected.item_id,
        item_key=rejected.item_key,
        attempt=1,
        status="failed",
        error_kind=str(rejected.failure.kind),
        error_message=rejected.failure.message,
        retryable=False,
        worker=DISCOVERY_WORKER,
    )
