"""Storage layer and catalog: safe ids, atomic commits, append-only parts, read-only SQL."""

from __future__ import annotations

import multiprocessing as mp
from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.catalog import Catalog, ReadOnlyQueryError
from storage.store import ArtifactStore, UnsafeIdError, safe_id


@pytest.mark.parametrize(
    "bad", ["../etc", "..", "a/b", "/abs", ".hidden", "", "a\\b", "x" * 200, "a..b", "sp ace"]
)
def test_safe_id_rejects_ids_that_could_escape(bad: str) -> None:
    with pytest.raises(UnsafeIdError):
        safe_id(bad)


def test_safe_id_accepts_dataset_ids() -> None:
    for good in ["hdtf-RD-Radio11_0", "-"[1:] + "a-JQqnqmEgg", "celebvhq-M2Ohb0FAaJU_1"]:
        assert safe_id(good) == good


def test_commit_is_atomic_and_checksummed(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "x.bin"
    src.write_bytes(b"hello" * 1000)
    ref = store.commit_file(src, "faces", "clip-1", "k" * 40, "crops.mp4", "video")
    final = Path(ref.uri)
    assert final.read_bytes() == src.read_bytes()
    assert ref.size_bytes == 5000
    assert not list(final.parent.glob(".tmp-*"))
    assert store.verify(ref)
    final.write_bytes(b"corrupt")
    assert not store.verify(ref)
    with pytest.raises(UnsafeIdError):
        store.commit_file(src, "faces", "../../escape", "k" * 40, "x", "video")


def _row(i: int, run: str = "r1") -> dict:
    return {
        "run_id": run,
        "stage": "faces",
        "item_id": f"clip-{i}",
        "item_key": f"key-{i}",
        "created_at": datetime.now(UTC),
        "status": "done",
        "attempt": 1,
        "retryable": False,
        "artifact_ids": [],
        "record_type": "",
        "record_json": "",
    }


def test_append_rejects_unknown_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no column"):
        Catalog(tmp_path).append("items", [{**_row(0), "bogus": 1}])


def _writer(root: str, worker: int, n: int) -> None:
    cat = Catalog(Path(root))
    for i in range(n):
        cat.append("items", [_row(worker * 1000 + i, run=f"w{worker}")])


def test_concurrent_writers_never_corrupt_the_catalog(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cat = Catalog(tmp_path)
    rows = cat.query("SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM items").to_pylist()
    assert rows == [{"n": 160, "d": 160}]
    assert not list((tmp_path / "items").glob(".tmp-*"))


def test_current_view_follows_the_latest_plan(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    now = datetime.now(UTC)
    for run, key in (("r1", "old"), ("r2", "new")):
        cat.append(
            "plans",
            [
                {
                    "run_id": run,
                    "stage": "faces",
                    "item_id": "c",
                    "item_key": key,
                    "action": "run",
                    "planned_at": datetime.now(UTC),
                }
            ],
        )
        cat.append(
            "items",
            [{**_row(0, run), "item_id": "c", "item_key": key, "created_at": datetime.now(UTC)}],
        )
    current = cat.query("SELECT run_id, item_key FROM current_items").to_pylist()
    assert current == [{"run_id": "r2", "item_key": "new"}]
    versions = cat.query("SELECT count(*) AS n FROM item_versions").to_pylist()
    assert versions == [{"n": 2}] and now < datetime.now(UTC)


def test_empty_catalog_has_every_view(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    for view in ("current_items", "current_clips", "failures", "eval_summary", "runs_latest"):
        assert cat.query(f"SELECT * FROM {view}").num_rows == 0


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM items",
        "CREATE TABLE x AS SELECT 1",
        "COPY items TO 'out.csv'",
        "SELECT 1; DROP VIEW items",
        "ATTACH 'other.db'",
        "INSTALL httpfs",
        "SET enable_external_access=true",
    ],
)
def test_sql_command_is_read_only(tmp_path: Path, sql: str) -> None:
    with pytest.raises(ReadOnlyQueryError):
        Catalog(tmp_path).query_readonly(sql)


def test_sql_cannot_read_files_outside_the_catalog(tmp_path: Path) -> None:
    cat = Catalog(tmp_path)
    cat.append("items", [_row(1)])
    assert cat.query_readonly("SELECT item_id FROM items").to_pylist() == [{"item_id": "clip-1"}]
    with pytest.raises(Exception, match=r"(?i)permission|disabled"):
        cat.query_readonly("SELECT * FROM read_csv('/etc/passwd')")
