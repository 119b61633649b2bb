"""The artifact catalog: one DuckLake (SQL metadata + parquet data) with duckdb views on top.

Design (README "Catalog"): every table of :mod:`storage.schema` is a DuckLake table
``lake.<table>``. A write is one DuckLake transaction — :meth:`Catalog.append_many` puts the
stats, artifact and item rows of a batch into one snapshot — so a reader sees all of a
commit or none of it, and a process killed mid-commit leaves nothing visible (at most
unreferenced parquet files, removed by ``vacuum``). This replaces the old "items row
written last" marker: there is no ordering to rely on any more, only snapshots. Small
commits are inlined in the metadata database (no parquet file per commit); compaction
flushes them into parquet and merges small files (:meth:`compact`, automatic past the
thresholds of :class:`~storage.lake.CatalogConfig`). Concurrent writer processes are
serialised by the metadata database and retried on conflict (:func:`storage.lake.retrying`).

Every commit is tagged with the run that made it (DuckLake commit message), so
``run_snapshots`` maps runs to snapshots and :meth:`as_of` reads the catalog as it was at
a run's last commit or any snapshot id.

Views (:mod:`storage.views`, all read-only): ``runs_latest``, ``item_versions``,
``current_plans``, ``current_items``, ``failures`` / ``current_failures``,
``current_<stats>``, ``artifact_versions``, ``current_artifacts``, ``current_split``,
``dataset_summary``, ``quality_summary``, ``quality_rules``, ``current_datasets``,
``current_manifest``, ``manifest_summary``, ``clip_progress``, ``current_leases``,
``run_snapshots``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from storage.guard import ReadOnlyQueryError, check_select, lock_down
from storage.lake import LAKE, CatalogConfig, open_lake, retrying, rollback
from storage.maintenance import Maintenance
from storage.schema import ALL_TABLES
from storage.views import view_statements

__all__ = ["Catalog", "CatalogConfig", "ReadOnlyQueryError", "SnapshotNotFoundError"]

T = TypeVar("T")

AUTHOR = "talkforge"
MAINTENANCE = "talkforge-maintenance"


class SnapshotNotFoundError(ValueError):
    """An ``--as-of`` that names neither a known run nor an existing snapshot."""


def to_arrow(table: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows as an arrow table of ``table``'s schema; unknown columns are refused."""
    rows = list(rows)
    schema = ALL_TABLES[table]
    unknown = set().union(*(r.keys() for r in rows)) - set(schema.names) if rows else set()
    if unknown:
        raise ValueError(f"table {table!r} has no column(s) {sorted(unknown)}")
    return pa.Table.from_pydict({n: [r.get(n) for r in rows] for n in schema.names}, schema=schema)


def from_columns(table: str, columns: Mapping[str, list[Any]]) -> pa.Table:
    """Columns (name -> values) as an arrow table of ``table``'s schema; absent ones null.

    The fast way to commit many rows: no dict per row (a 188 k-item plan).
    """
    schema = ALL_TABLES[table]
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise ValueError(f"table {table!r} has no column(s) {sorted(unknown)}")
    rows = len(next(iter(columns.values()))) if columns else 0
    return pa.table(
        {
            f.name: (
                pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(rows, f.type)
            )
            for f in schema
        },
        schema=schema,
    )


class Transaction:
    """The writes of one commit (see :meth:`Catalog.transaction`)."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, pa.Table]] = []

    def append(self, table: str, rows: Iterable[Mapping[str, Any]] | pa.Table) -> None:
        data = rows if isinstance(rows, pa.Table) else to_arrow(table, rows)
        if data.num_rows:
            self.parts.append((table, data))


class Catalog(Maintenance):
    """The DuckLake catalog under ``root`` (or at ``config.uri``), read and written by duckdb.

    Thread-safe within a process (one connection behind a lock), safe across processes
    (DuckLake transactions). ``snapshot`` pins a read-only view of an old version.
    """

    def __init__(
        self, root: Path, config: CatalogConfig | None = None, *, snapshot: int | None = None
    ):
        self.root = Path(root)
        self.config = config or CatalogConfig()
        self.uri = self.config.uri or f"ducklake:sqlite:{self.root / 'catalog.sqlite'}"
        self.data_path = self.config.data_path or f"{self.root / 'data'}/"
        self.snapshot = snapshot
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._pid = 0

    # ------------------------------------------------------------------ connections
    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        if self.config.uri is None:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.data_path.startswith(("s3://", "gs://", "az://", "http")):
            Path(self.data_path).mkdir(parents=True, exist_ok=True)
        if read_only or self.snapshot is not None:
            self._ensure_tables()  # a never-written catalog: create it, so views exist
        con = open_lake(
            self.uri,
            self.data_path,
            read_only=read_only,
            snapshot=self.snapshot,
            inline_row_limit=self.config.inline_row_limit,
            relocatable=self.config.uri is None and self.config.data_path is None,
        )
        if not read_only and self.snapshot is None:
            self._create_tables(con)
        try:
            for sql in view_statements():
                retrying(lambda sql=sql: con.execute(sql), self.config.commit_retries)
        except BaseException:
            con.close()
            raise
        return con

    def _ensure_tables(self) -> None:
        if self.snapshot is None:
            self._shared()
        else:
            Catalog(self.root, self.config)._shared()

    def _shared(self) -> duckdb.DuckDBPyConnection:
        """This process's read-write connection (reopened after a fork)."""
        if self._con is None or self._pid != os.getpid():
            self._con = self._open(read_only=self.snapshot is not None)
            self._pid = os.getpid()
        return self._con

    def _create_tables(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create missing tables and add missing columns (older catalogs), in one commit."""

        def create() -> None:
            have: dict[str, set[str]] = {}
            for t, c in con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?",
                [LAKE],
            ).fetchall():
                have.setdefault(t, set()).add(c)
            if all(set(s.names) <= have.get(t, set()) for t, s in ALL_TABLES.items()):
                return
            con.execute("BEGIN")
            try:
                for table, schema in ALL_TABLES.items():
                    if table not in have:
                        con.register("_empty", schema.empty_table())
                        con.execute(f"CREATE TABLE {LAKE}.{table} AS SELECT * FROM _empty")  # noqa: S608
                        con.unregister("_empty")
                        continue
                    for field in schema:
                        if field.name not in have[table]:
                            con.register("_empty", pa.schema([field]).empty_table())
                            kind = con.execute("DESCRIBE SELECT * FROM _empty").fetchone()[1]
                            con.unregister("_empty")
                            con.execute(
                                f"ALTER TABLE {LAKE}.{table} ADD COLUMN {field.name} {kind}"
                            )
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise

        for _ in range(self.config.commit_retries):
            try:
                return retrying(create, self.config.commit_retries)
            except duckdb.CatalogException as exc:  # another process created it first
                if "already exists" not in str(exc):
                    raise
        create()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new duckdb connection with every table and view defined (caller closes it)."""
        return self._open(read_only=self.snapshot is not None)

    def close(self) -> None:
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con = None

    # ------------------------------------------------------------------ writing
    @contextmanager
    def transaction(self, message: str = "") -> Iterator[Transaction]:
        """Collect writes; on exit they are committed as one snapshot (or not at all)."""
        tx = Transaction()
        yield tx
        self._commit(tx.parts, message)

    def append(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Append rows to ``table`` in one commit; returns its snapshot id (None: no rows)."""
        return self.append_many({table: rows})

    def append_many(
        self, tables: Mapping[str, Iterable[Mapping[str, Any]] | pa.Table], message: str = ""
    ) -> int | None:
        """Append several tables in one transaction: all rows become visible together."""
        tx = Transaction()
        for table, rows in tables.items():
            tx.append(table, rows)
        return self._commit(tx.parts, message)

    def _commit(self, parts: list[tuple[str, pa.Table]], message: str) -> int | None:
        if not parts:
            return None
        if self.snapshot is not None:
            raise ValueError(f"catalog as of snapshot {self.snapshot} is read-only")
        message = message or _run_of(parts)
        with self._lock:
            con = self._shared()

            def attempt() -> int:
                con.execute("BEGIN")
                try:
                    con.execute(
                        "CALL ducklake_set_commit_message(?, ?, ?)",
                        [LAKE, MAINTENANCE if message.startswith("catalog ") else AUTHOR, message],
                    )
                    for i, (table, data) in enumerate(parts):
                        name = f"_rows_{i}"
                        con.register(name, data)
                        con.execute(f"INSERT INTO {LAKE}.{table} BY NAME SELECT * FROM {name}")  # noqa: S608
                        con.unregister(name)
                    con.execute("COMMIT")
                except BaseException:
                    rollback(con)
                    raise
                row = con.execute(
                    "SELECT id FROM ducklake_last_committed_snapshot(?)", [LAKE]
                ).fetchone()
                return int(row[0]) if row and row[0] is not None else -1

            return retrying(attempt, self.config.commit_retries)

    # ------------------------------------------------------------------ reading
    def query(
        self,
        sql: str,
        params: list[Any] | dict[str, Any] | None = None,
        tables: Mapping[str, pa.Table] | None = None,
    ) -> pa.Table:
        """Run trusted internal SQL (the engine's own queries).

        ``tables``: arrow tables the SQL may name (e.g. the keys a plan asks about), so a
        lookup of many values is one join instead of one query per value.
        """
        with self._lock:
            con = self._shared()
            for name, data in (tables or {}).items():
                con.register(name, data)
            try:
                return retrying(
                    lambda: con.execute(sql, params or []).to_arrow_table(),
                    self.config.commit_retries,
                )
            finally:
                for name in tables or {}:
                    con.unregister(name)

    def read(
        self,
        session: Callable[[duckdb.DuckDBPyConnection], T],
        tables: Mapping[str, pa.Table] | None = None,
    ) -> T:
        """Run ``session(connection)`` — several trusted statements — on one snapshot.

        One read transaction under this process's lock, retried whole on a conflict;
        ``tables`` are registered for it. Temporary tables it creates live in the
        connection's own memory, never in the lake; it must drop them.
        """
        with self._lock:
            con = self._shared()
            for name, data in (tables or {}).items():
                con.register(name, data)

            def attempt() -> T:
                con.execute("BEGIN")
                try:
                    out = session(con)
                    con.execute("COMMIT")  # nothing of the lake was written
                except BaseException:
                    rollback(con)
                    raise
                return out

            try:
                return retrying(attempt, self.config.commit_retries)
            finally:
                for name in tables or {}:
                    con.unregister(name)

    def query_readonly(self, sql: str) -> pa.Table:
        """Run an ops engineer's SQL under the guard of :mod:`storage.guard`."""
        con = self._open(read_only=True)
        try:
            check_select(con, sql)
            dirs = [str(self.root.resolve()) + "/"]
            if not self.data_path.startswith(("s3://", "gs://", "az://", "http")):
                dirs.append(str(Path(self.data_path).resolve()) + "/")
            lock_down(con, dirs)
            return con.execute(sql).to_arrow_table()
        finally:
            con.close()

    # ------------------------------------------------------------------ versions
    def current_snapshot(self) -> int:
        if self.snapshot is not None:
            return self.snapshot
        rows = self.query("SELECT id FROM ducklake_current_snapshot(?)", [LAKE]).to_pylist()
        return int(rows[0]["id"])

    def resolve_snapshot(self, as_of: str) -> int:
        """A snapshot id from ``as_of``: a run id (its last commit) or a snapshot number."""
        rows = self.query(
            "SELECT last_snapshot FROM run_snapshots WHERE run_id = ?", [as_of]
        ).to_pylist()
        if rows:
            return int(rows[0]["last_snapshot"])
        if as_of.isdigit():
            known = self.query(
                f"SELECT max(snapshot_id) AS n FROM {LAKE}.snapshots()"  # noqa: S608
            ).to_pylist()[0]["n"]
            if known is not None and int(as_of) <= int(known):
                return int(as_of)
        raise SnapshotNotFoundError(
            f"{as_of!r} is neither a run id nor a snapshot of this catalog "
            "(`talkforge versions` lists them)"
        )

    def as_of(self, as_of: str | int) -> Catalog:
        """A read-only catalog as it was at a run's last commit or at a snapshot id."""
        snap = as_of if isinstance(as_of, int) else self.resolve_snapshot(as_of)
        return Catalog(self.root, self.config, snapshot=snap)


def _run_of(parts: list[tuple[str, pa.Table]]) -> str:
    """The run a commit belongs to: the single run id its rows carry ('' when mixed/none)."""
    runs: set[str] = set()
    for _, data in parts:
        if "run_id" in data.column_names:
            runs.update(v for v in data.column("run_id").unique().to_pylist() if v)
    return next(iter(runs)) if len(runs) == 1 else ""
