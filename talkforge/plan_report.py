"""``talkforge plan``: a dry run that says, per stage, what a run would do and why.

Nothing is executed, committed or leased. Each stage is planned against the catalog as it
is now (the engine's own planning, ``dry_run=True``), so a stage downstream of one that
would re-run shows what it holds today; its "why" then names the upstream change. Reasons
compare the stage's new version (code version, config hash, weights fingerprints) with
the current version of each item: one query per stage for the current versions, one for
the config of the runs that made them.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import yaml

from talkforge.engine import Engine
from talkforge.plan import RunOptions, new_run_id


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def dry_run(engine: Engine, options: RunOptions) -> list[dict[str, Any]]:
    """One row per selected stage: cached / would_run / retried / skipped_failed / dropped."""
    run_id = f"plan-{new_run_id()}"
    rows = []
    for stage in options.stages:
        plan = engine.plan(run_id, stage, options, dry_run=True)
        cfg = engine.config.stage(stage)
        new = engine.stage_version(stage)
        current = {
            r["item_id"]: r
            for r in engine.catalog.query(
                "SELECT item_id, run_id, code_version, config_hash, model_fingerprints_json "
                "FROM current_items WHERE stage = ?",
                [stage],
            ).to_pylist()
        }
        configs = _stage_configs(engine, stage, {r["run_id"] for r in current.values()})
        now_cfg = _flat(json.loads(cfg.model_dump_json()))
        reasons: Counter[str] = Counter()
        for item in plan.items:
            if item.action != "run":
                continue
            old = current.get(item.item_id)
            if item.attempt > 1:
                reasons["retry of a retryable failure"] += 1
            elif old is None:
                reasons["new item"] += 1
            elif old["code_version"] != new["code_version"]:
                reasons[f"code_version {old['code_version']} -> {new['code_version']}"] += 1
            elif old["config_hash"] != new["config_hash"]:
                before = configs.get(old["run_id"], {})
                keys = sorted(k for k in now_cfg if before.get(k) != now_cfg[k])
                reasons[f"config {', '.join(f'{stage}.{k}' for k in keys) or 'hash'}"] += 1
            elif _models(old) != new["models"]:
                changed = sorted(
                    k for k in new["models"] if _models(old).get(k) != new["models"][k]
                )
                reasons[f"weights {', '.join(changed) or 'set'} changed"] += 1
            else:
                reasons["upstream changed"] += 1
        rows.append(
            {
                "stage": stage,
                "items": plan.total,
                "cached": plan.count("cached"),
                "would_run": plan.count("run") - plan.retried,
                "retried": plan.retried,
                "skipped_failed": plan.count("skip_failed"),
                "dropped": len(plan.dropped),
                "why": "; ".join(f"{n} {r}" for r, n in reasons.most_common())
                or plan.blocked_reason,
            }
        )
    return rows


def _models(row: dict[str, Any]) -> dict[str, str]:
    data = json.loads(row["model_fingerprints_json"] or "{}")
    return {k: v.get("sha256", "") for k, v in data.items()}


def _stage_configs(engine: Engine, stage: str, run_ids: set[str]) -> dict[str, dict[str, Any]]:
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    rows = engine.catalog.query(
        "SELECT run_id, config_yaml FROM runs WHERE event = 'started' "  # noqa: S608 - marks only
        f"AND run_id IN ({marks})",
        sorted(run_ids),
    ).to_pylist()
    return {
        r["run_id"]: _flat((yaml.safe_load(r["config_yaml"]) or {}).get(stage) or {}) for r in rows
    }
