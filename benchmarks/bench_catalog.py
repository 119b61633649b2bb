"""Catalog at dataset scale: the DuckLake catalog vs the old parquet-part catalog.

For each size (items per stage) a synthetic catalog of eight stages with ``--runs`` runs of
history is built (bulk-loaded, then compacted, as the pipeline's auto-compaction leaves
it), and measured: commit latency (one batch of 4 items: stats + artifacts + items rows),
``status`` (ops.stage_status), a no-op plan of one stage (the engine's planning queries),
and three dashboard queries. The old format is rebuilt beside it with one part per table
per commit of ``--old-batch`` items, read the way the old code read it (duckdb views over
``read_parquet`` globs; the reader lives only here). Figures are ratios within one run.
Then a 188k-record TalkVid-format manifest is ingested and the download stage planned.

    .venv/bin/python benchmarks/bench_catalog.py --sizes 10000,50000 [--old-max 10000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.catalog import Catalog
from storage.schema import ALL_TABLES
from storage.views import view_statements
from talkforge import ops

STAGES = ["download", "faces", "quality", "features", "engram", "train", "generate", "evaluate"]

DASHBOARDS = {
    "failures_by_kind": "SELECT stage, error_kind, count(*) FROM current_failures GROUP BY ALL",
    "hours_per_dataset": "SELECT * FROM dataset_summary",
    "quality_rules": "SELECT * FROM quality_rules",
}


def _tables(n: int, runs: int) -> dict[str, pa.Table]:
    now = datetime.now(UTC)
    items, plans, clips, quality = [], [], [], []
    for r in range(runs):
        run = f"run-{r}"
        rows_run = []
        for stage in STAGES:
            for i in range(n):
                key = f"{stage}-{i}-v{r if stage == 'quality' else 0}"
                status = "failed" if i % 50 == 0 else "done"
                base = {"run_id": run, "stage": stage, "item_id": f"c{i}", "item_key": key}
                plans.append({**base, "action": "run", "planned_at": now})
                if r == 0 or stage == "quality":
                    rows_run.append(
                        {
                            **base,
                            "created_at": now,
                            "status": status,
                            "attempt": 1,
                            "retryable": False,
                            "error_kind": "network" if status == "failed" else "",
                        }
                    )
                    if stage == "download":
                        clips.append(
                            {
                                **base,
                                "created_at": now,
                                "dataset": f"d{i % 3}",
                                "duration_s": 5.0,
                                "fps": 25.0,
                            }
                        )
                    if stage == "quality":
                        quality.append(
                            {
                                **base,
                                "created_at": now,
                                "rule": "blur",
                                "value": i % 97,
                                "threshold": 15.0,
                                "passed": i % 7 != 0,
                                "hard": True,
                            }
                        )
        items += rows_run
    runs_rows = [
        {"run_id": f"run-{r}", "event": "started", "event_at": now, "stages": STAGES}
        for r in range(runs)
    ]
    out = {"items": items, "plans": plans, "clips": clips, "quality": quality, "runs": runs_rows}
    return {t: pa.Table.from_pylist(rows, schema=ALL_TABLES[t]) for t, rows in out.items()}


class OldCatalog:
    """The old parquet-part reader: views over every part of every table."""

    def __init__(self, root: Path):
        self.root = root

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        con = duckdb.connect()
        for t, schema in ALL_TABLES.items():
            if any((self.root / t).glob("part-*.parquet")):
                con.execute(
                    f"CREATE VIEW {t} AS SELECT * FROM read_parquet("
                    f"'{self.root / t}/part-*.parquet', union_by_name=true)"
                )
            else:
                con.register(f"_e_{t}", schema.empty_table())
                con.execute(f"CREATE VIEW {t} AS SELECT * FROM _e_{t}")
        con.execute("CREATE SCHEMA lake")
        for t in ALL_TABLES:
            con.execute(f"CREATE VIEW lake.{t} AS SELECT * FROM main.{t}")
        for s in view_statements()[len(ALL_TABLES) :]:
            if "run_snapshots" in s:
                continue
            con.execute(s)
        return con.execute(sql, params or []).fetch_arrow_table()


def _write_old(root: Path, tables: dict[str, pa.Table], batch: int) -> int:
    files = 0
    for t, data in tables.items():
        (root / t).mkdir(parents=True, exist_ok=True)
        step = {"runs": 1, "plans": n_per_plan(data)}.get(t, batch)
        for k, start in enumerate(range(0, data.num_rows, step)):
            pq.write_table(data.slice(start, step), root / t / f"part-{k:09d}.parquet")
            files += 1
    return files


def n_per_plan(plans: pa.Table) -> int:
    """The old engine wrote one plans part per (run, stage)."""
    return max(1, plans.num_rows // (len(STAGES) * len(set(plans.column("run_id").to_pylist()))))


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _plan_queries(cat) -> None:
    """The engine's no-op plan of 'faces': key states, upstream outputs, current plans."""
    cat.query(
        "SELECT item_key, arg_max(status, created_at), arg_max(retryable, created_at), "
        "count(*) FROM items WHERE stage = ? GROUP BY item_key",
        ["faces"],
    )
    cat.query(
        "SELECT stage, item_id, item_key, record_type, record_json FROM current_items "
        "WHERE status = 'done' AND stage IN (?)",
        ["download"],
    )
    cat.query(
        "SELECT DISTINCT item_id FROM current_plans WHERE stage = ? AND item_key <> ''", ["faces"]
    )


def _commit_batch(cat: Catalog, k: int) -> None:
    now = datetime.now(UTC)
    base = [
        {
            "run_id": "bench",
            "stage": "faces",
            "item_id": f"new-{k}-{i}",
            "item_key": f"nk-{k}-{i}",
            "created_at": now,
        }
        for i in range(4)
    ]
    cat.append_many(
        {
            "faces": [{**b, "num_frames": 10} for b in base],
            "artifacts": [{**b, "artifact_id": f"a{k}-{i}"} for i, b in enumerate(base)],
            "items": [{**b, "status": "done", "attempt": 1} for b in base],
        }
    )


def bench_size(n: int, runs: int, old: bool, old_batch: int, work: Path) -> dict:
    tables = _tables(n, runs)
    cat = Catalog(work / f"new-{n}")
    t = time.perf_counter()
    with cat.transaction("bench load") as tx:
        for name, data in tables.items():
            tx.append(name, data)
    load_s = time.perf_counter() - t
    cat.compact()
    commit = []
    for k in range(10):
        t = time.perf_counter()
        _commit_batch(cat, k)
        commit.append(time.perf_counter() - t)
    row = {
        "items_per_stage": n,
        "rows_items": tables["items"].num_rows,
        "load_s": load_s,
        "commit_ms_median": 1000 * sorted(commit)[5],
        "status_s": _timed(lambda: ops.stage_status(cat, "run-0")),
        "noop_plan_s": _timed(lambda: _plan_queries(cat)),
    }
    for name, sql in DASHBOARDS.items():
        row[f"{name}_s"] = _timed(lambda sql=sql: cat.query(sql))
    if old:
        root = work / f"old-{n}"
        row["old_files"] = _write_old(root, tables, old_batch)
        oc = OldCatalog(root)
        row["old_status_s"] = _timed(lambda: ops.stage_status(oc, "run-0"), 1)
        row["old_noop_plan_s"] = _timed(lambda: _plan_queries(oc), 1)
        for name, sql in DASHBOARDS.items():
            row[f"old_{name}_s"] = _timed(lambda sql=sql: oc.query(sql), 1)
    return row


def bench_manifest(records: int, work: Path) -> dict:
    import json

    from talkforge.config import load_config
    from talkforge.engine import Engine
    from talkforge.plan import RunOptions, StageSummary

    meta = work / "talkvid.json"
    with open(meta, "w") as f:
        f.write("[")
        for i in range(records):
            record = {
                "id": f"vid{i:07d}_{i % 5}",
                "height": 1080,
                "width": 1920,
                "fps": 25.0,
                "start-time": 1.0,
                "end-time": 9.0,
                "info": {
                    "Video Link": f"https://www.youtube.com/watch?v=v{i:09d}",
                    "Person ID": str(i // 3),
                    "Language": "English",
                },
                "dover_scores": 8.0,
                "cotracker_ratio": 0.9,
            }
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    cfg = load_config(
        None,
        [
            f"project.data_root={work / 'tv'}",
            "download.sample.enabled=false",
            f"download.datasets=[{{kind: talkvid, metadata: {meta}}}]",
            "execution.executor=local",
        ],
    )
    engine = Engine(cfg)
    out = {}
    for label in ("ingest+plan", "unchanged re-plan"):
        t = time.perf_counter()
        plan = engine.plan(f"bench-{label[:2]}", "download", RunOptions(stages=["download"]))
        engine.summarize(plan, StageSummary("download"))
        out[f"{label}_s"] = time.perf_counter() - t
    out["planned"] = len(plan.items)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old-max", type=int, default=10000, help="old format only up to this size")
    ap.add_argument("--old-batch", type=int, default=4, help="rows per old part (commit_every)")
    ap.add_argument("--manifest", type=int, default=188_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        work = Path(tmp)
        rows = [
            bench_size(int(n), args.runs, int(n) <= args.old_max, args.old_batch, work)
            for n in args.sizes.split(",")
        ]
        for r in rows:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
        if len(rows) > 1:
            print(
                "commit latency ratio largest/smallest:",
                round(rows[-1]["commit_ms_median"] / rows[0]["commit_ms_median"], 2),
            )
        if args.manifest:
            print("manifest", args.manifest, bench_manifest(args.manifest, work))


if __name__ == "__main__":
    main()
