"""The DuckLake catalog: atomic multi-table commits, concurrent and killed writers, time
travel, compaction under load, the read-only guard, migration of old parts, stage leases."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog, ReadOnlyQueryError, SnapshotNotFoundError
from storage.lease import StageBusyError, acquire, held_by_live_run, release
from storage.migrate import migrate_parts
from storage.schema import ALL_TABLES
from tests.catalog_helpers import load_old_code


def _batch(writer: int, batch: int, size: int = 3) -> dict[str, list[dict]]:
    now = datetime.now(UTC)
    base = [
        {
            "run_id": f"w{writer}",
            "stage": "download",
            "item_id": f"w{writer}-b{batch}-{i}",
            "item_key": f"k{batch}",
            "created_at": now,
        }
        for i in range(size)
    ]
    return {
        "clips": [{**b, "dataset": f"b{batch}", "duration_s": 1.0} for b in base],
        "artifacts": [{**b, "artifact_id": f"a-{b['item_id']}", "kind": "video"} for b in base],
        "items": [{**b, "status": "done", "attempt": 1} for b in base],
    }


def _writer(root: str, writer: int, batches: int) -> None:
    cat = Catalog(Path(root))
    for b in range(batches):
        cat.append_many(_batch(writer, b))


def _counts(cat: Catalog) -> dict[tuple[str, str], tuple[int, int, int]]:
    rows = cat.query(
        "SELECT run_id, item_key, "
        "(SELECT count(*) FROM clips c WHERE c.run_id = i.run_id AND c.item_key = i.item_key) "
        "AS clips, (SELECT count(*) FROM artifacts a WHERE a.run_id = i.run_id "
        "AND a.item_key = i.item_key) AS arts, count(*) AS items "
        "FROM items i GROUP BY run_id, item_key"
    ).to_pylist()
    return {(r["run_id"], r["item_key"]): (r["clips"], r["arts"], r["items"]) for r in rows}


def test_a_commit_is_all_or_nothing(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    bad = _batch(0, 0)
    bad["items"][1]["bogus"] = 1  # the last table of the commit is invalid
    with pytest.raises(ValueError, match="no column"):
        cat.append_many(bad)
    assert cat.query("SELECT count(*) AS n FROM clips").to_pylist() == [{"n": 0}]
    snap = cat.append_many(_batch(0, 1))
    assert snap == cat.current_snapshot()
    assert _counts(cat) == {("w0", "k1"): (3, 3, 3)}


def test_concurrent_writers_and_a_sigkill_mid_commit(tmp_path: Path) -> None:
    """Survivors' rows all land; the killed writer's batches are whole or absent."""
    ctx = mp.get_context("spawn")
    Catalog(tmp_path).query("SELECT 1")  # create the catalog once, before the race
    survivors = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in (1, 2)]
    victim = ctx.Process(target=_writer, args=(str(tmp_path), 9, 10_000))
    for p in [*survivors, victim]:
        p.start()
    deadline = time.time() + 60
    cat = Catalog(tmp_path)
    while time.time() < deadline:
        if cat.query("SELECT count(*) AS n FROM items WHERE run_id = 'w9'").to_pylist()[0]["n"]:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    for p in survivors:
        p.join(120)
        assert p.exitcode == 0
    counts = _counts(cat)
    for w in (1, 2):
        assert all(counts[(f"w{w}", f"k{b}")] == (3, 3, 3) for b in range(15))
    killed = [v for (run, _), v in counts.items() if run == "w9"]
    assert killed and all(v == (3, 3, 3) for v in killed)
    dupes = cat.query("SELECT count(*) - count(DISTINCT item_id) AS d FROM items").to_pylist()
    assert dupes == [{"d": 0}]


def test_time_travel_reads_a_run_as_it_was(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    cat.append_many(_batch(1, 0))
    cat.append_many(_batch(1, 1))
    then = cat.query("SELECT item_id FROM items ORDER BY item_id").to_pylist()
    cat.append_many(_batch(2, 0))
    old = cat.as_of("w1")
    assert old.query("SELECT item_id FROM items ORDER BY item_id").to_pylist() == then
    assert old.query_readonly("SELECT count(*) AS n FROM current_items").num_rows == 1
    with pytest.raises(ValueError, match="read-only"):
        old.append("items", _batch(3, 0)["items"])
    snap = cat.resolve_snapshot("w1")
    assert cat.as_of(str(snap)).query("SELECT count(*) AS n FROM items").to_pylist() == [{"n": 6}]
    with pytest.raises(SnapshotNotFoundError):
        cat.resolve_snapshot("no-such-run")
    runs = cat.query("SELECT run_id, commits FROM run_snapshots ORDER BY run_id").to_pylist()
    assert runs == [{"run_id": "w1", "commits": 2}, {"run_id": "w2", "commits": 1}]


def test_compaction_during_concurrent_writes_loses_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    cat = Catalog(tmp_path)
    for b in range(10):
        cat.append_many(_batch(0, b))
    before = cat.query("SELECT * FROM items ORDER BY item_id").to_pylist()
    writer = ctx.Process(target=_writer, args=(str(tmp_path), 5, 20))
    writer.start()
    stats = [cat.compact() for _ in range(3)]
    writer.join(120)
    assert writer.exitcode == 0
    assert stats[0]["inlined_rows_before"] > 0
    cat.compact()
    assert cat.file_stats()["inlined_rows"] == 0
    after = cat.query("SELECT * FROM items WHERE run_id = 'w0' ORDER BY item_id").to_pylist()
    assert after == before
    counts = _counts(cat)
    assert all(counts[("w5", f"k{b}")] == (3, 3, 3) for b in range(20))
    assert cat.vacuum(0)["snapshots_expired"] >= 0
    assert cat.query("SELECT count(*) AS n FROM items").to_pylist() == [{"n": 90}]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM ducklake_expire_snapshots('lake', older_than => now())",
        "SELECT * FROM ducklake_flush_inlined_data('lake')",
        "SELECT * FROM ducklake_add_data_files('lake', 'items', '/etc/passwd')",
        "SELECT * FROM ducklake_snapshots('lake')",
        "SELECT * FROM sqlite_scan('/etc/passwd', 'x')",
        "SELECT * FROM postgres_execute('lake', 'DROP TABLE items')",
        "SELECT * FROM query('SELECT * FROM ducklake_cleanup_old_files(''lake'')')",
        "WITH x AS (SELECT * FROM ducklake_merge_adjacent_files('lake')) SELECT * FROM x",
        "CALL ducklake_expire_snapshots('lake', older_than => now())",
        "DETACH lake",
        "ATTACH 'ducklake:sqlite:/tmp/other.sqlite' AS other",
        "COPY (SELECT 1) TO '/tmp/x.parquet'",
        "INSERT INTO lake.items (run_id) VALUES ('x')",
    ],
)
def test_read_only_guard_covers_the_lake(tmp_path: Path, sql: str) -> None:
    with pytest.raises(ReadOnlyQueryError):
        Catalog(tmp_path).query_readonly(sql)


def test_read_only_guard_blocks_files_and_metadata_writes(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    cat.append_many(_batch(1, 0))
    assert cat.query_readonly("SELECT count(*) AS n FROM items").to_pylist() == [{"n": 3}]
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        f"SELECT * FROM read_text('{tmp_path.parent}/*')",
    ):
        with pytest.raises(Exception, match=r"(?i)permission|disabled|not allowed"):
            cat.query_readonly(sql)
    snaps = cat.current_snapshot()
    # the metadata database may be read (it is attached read-only), never written
    cat.query_readonly("SELECT count(*) FROM __ducklake_metadata_lake.ducklake_snapshot")
    assert cat.current_snapshot() == snaps


def _old_part(root: Path, table: str, rows: list[dict], drop: tuple[str, ...] = ()) -> None:
    """A part exactly as the parquet-part catalog wrote it (schema of its time)."""
    schema = ALL_TABLES[table]
    fields = [f for f in schema if f.name not in drop]
    data = pa.Table.from_pydict(
        {f.name: [r.get(f.name) for r in rows] for f in fields}, schema=pa.schema(fields)
    )
    (root / table).mkdir(parents=True, exist_ok=True)
    pq.write_table(data, root / table / f"part-{time.time_ns():020d}-abc.parquet")


def test_migrate_imports_an_old_parts_catalog(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    for b in range(3):
        batch = _batch(1, b)
        for table in ("clips", "artifacts", "items"):
            _old_part(tmp_path, table, batch[table])
    _old_part(
        tmp_path,
        "runs",
        [{"run_id": "w1", "event": "started", "event_at": now, "stages": ["download"]}],
        drop=("snapshot_id",),  # the old runs table had no snapshot column
    )
    _old_part(
        tmp_path,
        "plans",
        [
            {"run_id": "w1", "stage": "download", "item_id": f"w1-b{b}-{i}", "item_key": f"k{b}"}
            | {"action": "run", "planned_at": now}
            for b in range(3)
            for i in range(3)
        ],
    )
    cat = Catalog(tmp_path)
    counts = migrate_parts(cat)
    assert counts == {"runs": 1, "plans": 9, "items": 9, "artifacts": 9, "clips": 9}
    assert cat.query("SELECT count(*) AS n FROM current_clips").to_pylist() == [{"n": 9}]
    assert cat.query("SELECT snapshot_id FROM runs").to_pylist() == [{"snapshot_id": None}]
    assert not (tmp_path / "items").exists() and (tmp_path / "legacy-parts" / "items").is_dir()
    assert migrate_parts(cat) == {}


def test_a_stage_lease_refuses_a_second_run(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    first = acquire(cat, "faces", "run-a")
    with pytest.raises(StageBusyError, match=r"run-a.*--force"):
        acquire(Catalog(tmp_path), "faces", "run-b")
    other = acquire(cat, "quality", "run-b")  # another stage is free
    release(cat, other)
    forced = acquire(cat, "faces", "run-c", force=True)
    release(cat, forced)
    release(cat, first)
    assert cat.query("SELECT count(*) AS n FROM current_leases").to_pylist() == [{"n": 0}]


def _contender(root: str, run: str, out: mp.Queue) -> None:
    try:
        acquire(Catalog(Path(root)), "download", run)
        out.put(run)
        time.sleep(3)  # keep the process (and so the lease) alive while the other checks
    except StageBusyError:
        out.put("busy")


def test_racing_runs_get_exactly_one_lease(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    Catalog(tmp_path).query("SELECT 1")
    out = ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), f"r{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results.count("busy") == 2, results
    # the winner's process has exited: its lease is stale and the next run takes over
    release(Catalog(tmp_path), acquire(Catalog(tmp_path), "download", "r-next"))


def test_a_dead_holder_on_this_host_is_stale(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    lease = acquire(cat, "faces", "crashed")
    cat.query("SELECT 1")
    cat.append(
        "leases",
        [
            {
                "lease_id": "dead",
                "stage": "train",
                "run_id": "crashed",
                "event": "acquired",
                "host": os.uname().nodename,
                "pid": proc.pid,
                "event_at": datetime.now(UTC),
            }
        ],
    )
    assert held_by_live_run(cat, "faces")  # this process holds it
    assert not held_by_live_run(cat, "train")  # only the dead process's row is left
    assert not held_by_live_run(cat, "quality")  # never held
    release(cat, acquire(cat, "train", "next"))
    release(cat, lease)
    assert not held_by_live_run(cat, "faces")


def test_migrate_a_catalog_written_by_the_previous_code(tmp_path: Path) -> None:
    """The parquet-part Catalog of commit 3c6e47d (from git history) writes a run the way
    its engine did; after `migrate` the new catalog answers the same questions."""
    try:
        code = load_old_code(tmp_path / "old_code")
    except FileNotFoundError as exc:
        pytest.skip(f"no git history here: {exc}")
    root = tmp_path / "catalog"
    old = code["old_catalog"].Catalog(root)
    now = datetime.now(UTC)
    old.append("runs", [{"run_id": "w1", "event": "started", "event_at": now, "stages": ["x"]}])
    old.append(
        "plans",
        [
            {"run_id": "w1", "stage": "download", "item_id": f"w1-b{b}-{i}", "item_key": f"k{b}"}
            | {"action": "run", "planned_at": now}
            for b in range(4)
            for i in range(3)
        ],
    )
    for b in range(4):
        batch = _batch(1, b)
        batch["items"][0] |= {"status": "failed", "error_kind": "network", "retryable": True}
        old.append_many(batch)  # stats, artifacts, then items: its commit marker
    questions = [
        "SELECT stage, item_id, item_key, status, error_kind FROM current_items ORDER BY item_id",
        "SELECT * FROM dataset_summary",
        "SELECT stage, item_id, error_kind FROM current_failures ORDER BY item_id",
        "SELECT artifact_id, item_id FROM current_artifacts ORDER BY artifact_id",
    ]
    before = [old.query(q).to_pylist() for q in questions]
    cat = Catalog(root)
    counts = migrate_parts(cat)
    assert counts == {"runs": 1, "plans": 12, "items": 12, "artifacts": 12, "clips": 12}
    assert [cat.query(q).to_pylist() for q in questions] == before
    assert cat.query_readonly("SELECT count(*) AS n FROM current_failures").to_pylist() == [
        {"n": 4}
    ]
    assert migrate_parts(cat) == {}  # the parts moved to legacy-parts/: nothing twice
