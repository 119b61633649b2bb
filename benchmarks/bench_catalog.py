"""Catalog at dataset scale: the DuckLake catalog vs the old parquet-part catalog, one run.

    .venv/bin/python benchmarks/bench_catalog.py [--sizes 10000,50000,200000] [--runs 3]
        [--old-sizes 200,800] [--manifest 188000] [--out bench-out]

**New catalog**, per size N (items per stage): a synthetic history of ``--runs`` runs over
eight stages, written as the engine writes it — run 0 plans and processes every item of
every stage; each later run plans every stage again and re-runs ``quality`` (a changed
threshold), the rest cached — each (run, stage) one transaction, then compacted (as the
pipeline's auto-compaction leaves it). Measured: commit latency (a 4-item batch: stats +
artifact + item rows, one transaction; median of 20), ``status`` of the last run
(``ops.stage_status``), a no-op plan of ``faces`` through the real ``Engine.plan`` (lease,
candidates, the plan's commit: every item cached) twice — ``noop_plan_decided_s``: an item
row of the stage arrived since its last plan, so every item is keyed and decided in SQL
(key states, current versions, dropped items); ``noop_plan_s``: nothing arrived, the
last plan's counts are reused — and three dashboard queries. Plan rows are written as
the engine writes them: only for items that run or change key (``every_row`` for the old
catalog, whose engine wrote a row per item and run).

**Old catalog** (one parquet part per table per commit): the code of commit ``3c6e47d``
(``storage/catalog.py``, ``storage/schema.py``, ``talkforge/ops.py``) is loaded from git
history into temporary modules — nothing of it is kept in the tree — and writes the same
history with one part per commit of ``--old-batch`` items, as its engine did; its
``status``, its engine's three planning queries and the same dashboards are timed. It is
measured at ``--old-sizes`` only (at 1 ms per file and ~0.8 files per item it takes minutes
per query beyond that); the per-file cost measured there is extrapolated to each N and
printed as such.

**Manifest**: a generated TalkVid-format manifest of ``--manifest`` records is ingested and
the download stage planned by the real engine, twice (new manifest; unchanged manifest),
with the breakdown and peak RSS of a fresh process. Figures go to ``<out>/bench_catalog.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.catalog import from_columns  # noqa: E402
from storage.schema import ALL_TABLES  # noqa: E402
from talkforge import ops  # noqa: E402
from talkforge.config import load_config  # noqa: E402
from talkforge.engine import Engine  # noqa: E402
from talkforge.plan import RunOptions, StageSummary, key_hasher  # noqa: E402
from talkforge.stages import STAGE_ORDER  # noqa: E402
from tests.catalog_helpers import load_old_code, write_talkvid_manifest  # noqa: E402

STAGES = STAGE_ORDER[:8]
DASHBOARDS = {
    "failures_by_kind": "SELECT stage, error_kind, count(*) AS n FROM current_failures "
    "GROUP BY ALL",
    "hours_per_dataset": "SELECT * FROM dataset_summary",
    "quality_rules": "SELECT * FROM quality_rules",
}
OLD_PLAN_QUERIES = [  # the old engine's no-op plan of faces (3c6e47d talkforge/engine.py)
    (
        "SELECT stage, item_id, item_key, record_type, record_json FROM current_items "
        "WHERE status = 'done' AND stage IN (?)",
        ["download"],
    ),
    (
        "SELECT item_key, arg_max(status, created_at) AS status, arg_max(retryable, created_at) "
        "AS retryable, count(*) AS attempts FROM items WHERE stage = ? GROUP BY item_key",
        ["faces"],
    ),
    ("SELECT DISTINCT item_id FROM current_plans WHERE stage = ? AND item_key <> ''", ["faces"]),
]


# ---------------------------------------------------------------------- synthetic history
def history(
    n: int, runs: int, faces_key: Callable[[Any], str], *, every_row: bool = False
) -> Iterator[dict[str, Any]]:
    """One entry per (run, stage) commit: table -> rows (dict of columns), in commit order.

    Plan rows as the engine writes them: a row per item that runs or changed key (run 0
    everything, later runs ``quality``), counts in ``stage_runs``; ``every_row``: a row
    per item of every plan, as the old engine wrote them.
    """
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [f"c{i:07d}" for i in range(n)]
    dl_keys = [f"dl-{i:07d}" for i in range(n)]
    for r in range(runs):
        run = f"run-{r}"
        for s, stage in enumerate(STAGES):
            at = start + timedelta(hours=r, minutes=s)
            rerun = r == 0 or stage == "quality"
            if stage == "download":
                keys = dl_keys
            elif stage == "faces":
                keys = [faces_key({"download": k}) for k in dl_keys]
            else:
                keys = [f"{stage}-{i:07d}-v{r if stage == 'quality' else 0}" for i in range(n)]
            failed = [i % 50 == 0 for i in range(n)]
            listed = n if rerun or every_row else 0
            tables: dict[str, dict[str, list[Any]]] = {
                "plans": {
                    "run_id": [run] * listed,
                    "stage": [stage] * listed,
                    "item_id": ids[:listed],
                    "item_key": keys[:listed],
                    "action": ["run" if rerun else "cached"] * listed,
                    "planned_at": [at] * listed,
                },
                "stage_runs": {
                    "run_id": [run],
                    "stage": [stage],
                    "planned_at": [at],
                    "complete": [True],
                    "lists_all": [listed == n],
                    "items": [n],
                    "to_run": [n if rerun else 0],
                    "retried": [0],
                    "cached_done": [0 if rerun else n - sum(failed)],
                    "cached_filtered": [0],
                    "skip_failed": [0 if rerun else sum(failed)],
                    "dropped": [0],
                    "blocked_reason": [""],
                },
            }
            if rerun:
                item = {
                    "run_id": [run] * n,
                    "stage": [stage] * n,
                    "item_id": ids,
                    "item_key": keys,
                    "created_at": [at + timedelta(seconds=30)] * n,
                }
                tables["items"] = {
                    **item,
                    "status": ["failed" if f else "done" for f in failed],
                    "error_kind": ["network" if f else "" for f in failed],
                    "retryable": [False] * n,
                    "attempt": [1] * n,
                    "artifact_ids": [[f"a-{k}"] for k in keys],
                }
                tables["artifacts"] = {**item, "artifact_id": [f"a-{k}" for k in keys]}
                if stage == "download":
                    tables["clips"] = {
                        **item,
                        "dataset": [f"d{i % 3}" for i in range(n)],
                        "duration_s": [5.0] * n,
                        "fps": [25.0] * n,
                    }
                if stage == "quality":
                    tables["quality"] = {
                        **item,
                        "rule": ["blur"] * n,
                        "value": [float(i % 97) for i in range(n)],
                        "threshold": [15.0 + r] * n,
                        "passed": [i % 7 != 0 for i in range(n)],
                        "hard": [True] * n,
                        "reason": [""] * n,
                    }
            yield tables
        yield (
            {
                "runs": {
                    "run_id": [run],
                    "event": ["started"],
                    "event_at": [start],
                    "stages": [STAGES],
                }
            }
        )


def batch(k: int) -> dict[str, list[dict[str, Any]]]:
    now = datetime.now(UTC)
    base = [
        {"run_id": "bench", "stage": "faces", "item_id": f"new-{k}-{i}", "item_key": f"nk-{k}-{i}"}
        | {"created_at": now}
        for i in range(4)
    ]
    return {
        "faces": [{**b, "num_frames": 10} for b in base],
        "artifacts": [{**b, "artifact_id": f"a{k}-{i}"} for i, b in enumerate(base)],
        "items": [{**b, "status": "done", "attempt": 1} for b in base],
    }


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------- new catalog
def bench_new(n: int, runs: int, work: Path) -> dict[str, Any]:
    root = work / f"new-{n}"
    cfg = load_config(
        None,
        [f"project.data_root={root}", "download.sample.enabled=false", "execution.executor=local"],
    )
    engine = Engine(cfg)
    cat = engine.catalog
    faces_key = key_hasher(engine.stage_version("faces"))
    t = time.perf_counter()
    for tables in history(n, runs, faces_key):
        with cat.transaction(
            tables.get("runs", tables.get("stage_runs", {})).get("run_id", [""])[0]
        ) as tx:
            for name, cols in tables.items():
                tx.append(name, from_columns(name, cols))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    cat.compact()
    compact_s = time.perf_counter() - t
    commit = []
    for k in range(20):
        t = time.perf_counter()
        cat.append_many(batch(k))
        commit.append(time.perf_counter() - t)
    last = f"run-{runs - 1}"
    status = ops.stage_status(cat, last)
    assert status and status[0]["items"] == n, status

    def noop_plan() -> None:
        plan = engine.plan(f"noop-{time.time_ns()}", "faces", RunOptions(stages=["faces"]))
        assert not plan.to_run, f"{len(plan.to_run)} of {n} would run"
        engine.summarize(plan, StageSummary("faces"))

    def decided_noop_plan() -> float:
        """A no-op plan that must decide every item: an item row of the stage arrived
        since its last plan (a stray one here: it changes no decision)."""
        cat.append_many(batch(1000 + len(commit)))
        commit.append(0.0)
        t = time.perf_counter()
        noop_plan()
        return time.perf_counter() - t

    row: dict[str, Any] = {
        "items_per_stage": n,
        "item_rows": cat.query("SELECT count(*) AS n FROM items").to_pylist()[0]["n"],
        "plan_rows": cat.query("SELECT count(*) AS n FROM plans").to_pylist()[0]["n"],
        "data_files": cat.file_stats()["files"],
        "load_s": load_s,
        "compact_s": compact_s,
        "commit_ms": 1000 * statistics.median(commit),
        "status_s": timed(lambda: ops.stage_status(cat, last)),
        # every item keyed and decided in SQL (the first plan after a run that did work)
        "noop_plan_decided_s": min(decided_noop_plan() for _ in range(2)),
        # the same plan again, nothing arrived since: its counts are reused
        "noop_plan_s": timed(noop_plan, 2),
    }
    for name, sql in DASHBOARDS.items():
        row[f"{name}_s"] = timed(lambda sql=sql: cat.query(sql))
    engine.close()
    return row


# ---------------------------------------------------------------------- old catalog
def write_old(catalog: Any, commits: Iterator[dict[str, Any]], per_part: int) -> None:
    """The same history through the old writer: a part per table per commit of items
    (``per_part`` items, the engine's ``commit_every``); plans one part per (run, stage)."""
    schema = sys.modules["old_schema"].ALL_TABLES
    for tables in commits:
        for name, cols in tables.items():
            if name not in schema:
                continue  # stage_runs did not exist
            rows = from_columns(name, cols).select(
                [c for c in schema[name].names if c in ALL_TABLES[name].names]
            )
            step = rows.num_rows if name in ("plans", "runs") else per_part
            for start in range(0, rows.num_rows, step):
                catalog.append(name, rows.slice(start, step).to_pylist())


def bench_old(n: int, runs: int, per_part: int, work: Path) -> dict[str, Any]:
    code = load_old_code(work / "old_code")
    old_catalog, old_ops = code["old_catalog"].Catalog, code["old_ops"]
    root = work / f"old-{n}"
    cat = old_catalog(root)
    t = time.perf_counter()
    write_old(cat, history(n, runs, lambda k: f"faces-{k['download']}", every_row=True), per_part)
    files = sum(1 for _ in root.rglob("part-*.parquet"))
    row: dict[str, Any] = {"items_per_stage": n, "files": files, "write_s": time.perf_counter() - t}
    row["status_s"] = timed(lambda: old_ops.stage_status(cat, f"run-{runs - 1}"), 1)
    row["noop_plan_s"] = timed(lambda: [cat.query(q, p) for q, p in OLD_PLAN_QUERIES], 1)
    for name, sql in DASHBOARDS.items():
        row[f"{name}_s"] = timed(lambda sql=sql: cat.query(sql), 1)
    return row


# ---------------------------------------------------------------------- manifest
def bench_manifest(records: int, work: Path) -> dict[str, Any]:
    """Ingest + plan of the download stage in a fresh process (its own peak RSS)."""
    meta = write_talkvid_manifest(work / "talkvid.json", records)
    code = f"""
import json, sys, time
t0 = time.perf_counter()
from talkforge.config import load_config
from talkforge.engine import Engine
from talkforge.plan import RunOptions, StageSummary, key_hasher
import talkforge.manifests as m
import_s = time.perf_counter() - t0
def peak_mb():  # this process's own high-water mark (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
rss_import = peak_mb()
parts = {{}}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
    return wrapper
import talkforge.engine as e
import tasks.download.datasets as d
m.ingest_manifest = timed("ingest_s", m.ingest_manifest)  # convert, hash, write: streamed
m._stored_rows = timed("stored_rows_s", m._stored_rows)
m.record_hash = timed("record_hash_s", m.record_hash)
d.TalkvidReader.__init__ = timed("parse_json_s", d.TalkvidReader.__init__)
d.fingerprint_files = timed("file_sha256_s", d.fingerprint_files)
e.plan_candidates = timed("candidates_s", e.plan_candidates)  # manifest rows -> candidates
e.decide = timed("decide_s", e.decide)  # keys, decisions and dropped items, in SQL
cfg = load_config(None, ["project.data_root={work / "tv"}", "download.sample.enabled=false",
    "download.datasets=[{{kind: talkvid, metadata: {meta}}}]", "execution.executor=local"])
engine = Engine(cfg)
out = {{"import_s": import_s, "rss_after_imports_mb": rss_import}}
for label in ("new", "unchanged"):
    parts.clear()
    t = time.perf_counter()
    plan = engine.plan("bench-" + label, "download", RunOptions(stages=["download"]))
    engine.summarize(plan, StageSummary("download"))
    out[label] = {{"total_s": time.perf_counter() - t, **parts, "items": len(plan.items),
                  "to_run": len(plan.to_run)}}
out["peak_rss_mb"] = peak_mb()
engine.close()
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["records"] = records
    result["json_mb"] = meta.stat().st_size / 1e6
    return result


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old-sizes", default="200,800")
    ap.add_argument("--old-batch", type=int, default=4, help="items per old commit")
    ap.add_argument("--manifest", type=int, default=188_000)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"runs": args.runs, "stages": STAGES, "cpus": os.cpu_count()}

    def show(label: str, row: dict[str, Any]) -> None:
        fmt = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        print(label, json.dumps(fmt), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        work = Path(tmp)
        result["old"] = []
        for n in [int(x) for x in args.old_sizes.split(",") if x and int(x)]:
            result["old"].append(bench_old(n, args.runs, args.old_batch, work))
            show("old", result["old"][-1])
        result["new"] = []
        for n in [int(x) for x in args.sizes.split(",") if x]:
            result["new"].append(bench_new(n, args.runs, work))
            show("new", result["new"][-1])
        if args.manifest:
            result["manifest"] = bench_manifest(args.manifest, work)
            show("manifest", result["manifest"])
    new, old = result["new"], result["old"]
    summary: dict[str, Any] = {}
    if len(new) > 1:
        summary["commit_ratio_largest_smallest"] = new[-1]["commit_ms"] / new[0]["commit_ms"]
        for key in (
            "status_s",
            "noop_plan_decided_s",
            "noop_plan_s",
            *(f"{d}_s" for d in DASHBOARDS),
        ):
            summary[f"{key}_growth_vs_rows"] = (new[-1][key] / new[0][key]) / (
                new[-1]["items_per_stage"] / new[0]["items_per_stage"]
            )
    if old:
        per_file = {
            key: old[-1][key] / old[-1]["files"]
            for key in ("status_s", "noop_plan_s", *(f"{d}_s" for d in DASHBOARDS))
        }
        files_per_item = old[-1]["files"] / old[-1]["items_per_stage"]
        for row in new:
            files = files_per_item * row["items_per_stage"]
            for key, cost in per_file.items():
                summary[f"old_extrapolated_{key}@{row['items_per_stage']}"] = cost * files
                summary[f"new_{key}@{row['items_per_stage']}"] = row[key]
    result["summary"] = summary
    show("summary", summary)
    (out / "bench_catalog.json").write_text(json.dumps(result, indent=1, default=str))
    print(
        "peak RSS of this process (MB):", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
