"""DuckLake plumbing: offline extension loading, attaching the catalog, retried commits.

The catalog is a DuckLake: its metadata (snapshots, table and file lists, small inlined
commits) lives in a SQL database — SQLite under ``data_root`` by default, Postgres for a
shared deployment — and its rows in parquet files under the data path. DuckDB reads and
writes it through the ``ducklake`` extension; the SQLite/Postgres back ends through the
``sqlite_scanner`` / ``postgres_scanner`` extensions. All three come from PyPI packages
pinned to duckdb's exact version and are loaded by file path, never downloaded
(``autoinstall_known_extensions`` and ``autoload_known_extensions`` are off). DuckDB
derives an extension's name from its file name, so the SQLite one (shipped as
``sqlite.duckdb_extension``) is linked under ``sqlite_scanner.duckdb_extension`` first
(and Postgres' under ``postgres_scanner.duckdb_extension``).

Conflicts: DuckLake resolves concurrent appends itself; what is left (two processes
creating tables at once, SQLite's ``database is locked``) surfaces as a duckdb error that
:func:`retrying` retries with jittered exponential backoff.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

LAKE = "lake"  # the name the DuckLake is attached under in every connection


class CatalogConfig(BaseModel):
    """Where the catalog lives and how it is kept (``catalog:`` in the pipeline YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str | None = Field(
        None,
        description="DuckLake URI; default ducklake:sqlite:<data_root>/catalog/catalog.sqlite; "
        "a cluster: 'ducklake:postgres:dbname=talkforge host=db user=tf'",
    )
    data_path: str | None = Field(
        None, description="parquet data folder; default <data_root>/catalog/data/ (or s3://...)"
    )
    inline_row_limit: int = Field(
        1000, ge=0, description="commits up to this many rows per table stay in the metadata DB"
    )
    compact_after_files: int = Field(
        64, ge=1, description="auto-compaction when a table has more data files than this"
    )
    compact_after_inlined_rows: int = Field(
        20000, ge=1, description="auto-compaction when inlined rows exceed this"
    )
    commit_retries: int = Field(30, ge=1, description="attempts of a conflicting commit")


def _extension_file(package: str, file_name: str) -> Path:
    module = __import__(package)
    folder = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    path = folder / file_name
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: install {package.replace('_', '-')}=={duckdb.__version__}"
        )
    return path


def extension_paths(backend: str) -> list[Path]:
    """Files to LOAD, in order: ducklake, then the metadata back end's scanner."""
    paths = [_extension_file("duckdb_extension_ducklake", "ducklake.duckdb_extension")]
    if backend in ("sqlite", "postgres"):
        src = _extension_file(f"duckdb_extension_{backend}", f"{backend}.duckdb_extension")
        paths.append(_linked(src, f"{backend}_scanner.duckdb_extension"))
    return paths


def _linked(src: Path, name: str) -> Path:
    """``src`` under the file name duckdb expects (a symlink in a per-user temp folder)."""
    folder = Path(tempfile.gettempdir()) / f"talkforge-duckdb-{duckdb.__version__}-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise RuntimeError(f"{folder} belongs to another user; remove it")
    link = folder / name
    if not link.exists():
        tmp = folder / f".{os.getpid()}-{random.getrandbits(32):x}"
        tmp.symlink_to(src)
        os.replace(tmp, link)
    return link


def backend_of(uri: str) -> str:
    if not uri.startswith("ducklake:"):
        raise ValueError(f"catalog uri {uri!r} must start with 'ducklake:'")
    rest = uri[len("ducklake:") :]
    for name in ("sqlite", "postgres"):
        if rest.startswith(name + ":"):
            return name
    return "duckdb"  # a duckdb file as metadata store: one process at a time


def open_lake(
    uri: str,
    data_path: str,
    *,
    read_only: bool = False,
    snapshot: int | None = None,
    inline_row_limit: int = 1000,
    relocatable: bool = False,
) -> duckdb.DuckDBPyConnection:
    """An in-memory duckdb connection with the DuckLake attached as ``lake``.

    ``relocatable``: the metadata database and the data folder move together (the embedded
    default, both under ``data_root``), so a copied or moved ``data_root`` reads its own
    data folder instead of refusing the path recorded when the lake was created. Data
    files are recorded relative to the data path, so nothing else changes.
    """
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        },
    )
    use_wal(uri)
    try:
        con.execute("SET enable_progress_bar=false")
        for path in extension_paths(backend_of(uri)):
            con.execute(f"LOAD '{_quote(str(path))}'")
        options = [
            f"DATA_PATH '{_quote(data_path)}'",
            f"DATA_INLINING_ROW_LIMIT {int(inline_row_limit)}",
        ]
        if relocatable:
            options.append("OVERRIDE_DATA_PATH TRUE")
        if read_only or snapshot is not None:
            options.append("READ_ONLY")
        if snapshot is not None:
            options.append(f"SNAPSHOT_VERSION {int(snapshot)}")
        retrying(
            lambda: con.execute(f"ATTACH '{_quote(uri)}' AS {LAKE} ({', '.join(options)})"),
            attempts=30,
        )
    except BaseException:
        con.close()
        raise
    return con


def use_wal(uri: str) -> None:
    """Put a SQLite metadata database in write-ahead-log mode (once; the mode persists).

    In the default rollback-journal mode a writer waiting to commit and a process holding
    a read lock block each other ("database is locked" on both sides); with WAL, readers
    never block the writer and writers queue on one lock held only while committing.
    Switching needs no other open connection, so it is tried, never required.
    """
    if backend_of(uri) != "sqlite":
        return
    path = uri[len("ducklake:sqlite:") :]
    if path in ("", ":memory:"):
        return
    try:
        con = sqlite3.connect(path, timeout=5)
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.Error:
        pass  # busy (another process has it open): the next open tries again


def _quote(text: str) -> str:
    return text.replace("'", "''")


_RETRYABLE = ("conflict", "database is locked", "busy", "could not serialize", "deadlock")


def is_retryable(exc: BaseException) -> bool:
    """A commit conflict or a locked metadata database: worth trying again."""
    return isinstance(exc, duckdb.Error) and any(m in str(exc).lower() for m in _RETRYABLE)


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """End ``con``'s open transaction, if any (a failed statement may have ended it)."""
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")


def retrying(
    fn: Callable[[], T],
    attempts: int,
    on_retry: Callable[[], None] | None = None,
    patience_s: float = 60.0,
    retryable: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """Call ``fn`` until it succeeds; retry only conflicts, with jittered backoff.

    Gives up after ``attempts`` tries *and* ``patience_s`` seconds, whichever is later: a
    SQLite metadata database has no busy timeout through duckdb, so a long compaction in
    another process shows up as "database is locked" until it commits.
    """
    delay = 0.005
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except duckdb.Error as exc:
            late = attempt >= attempts and time.monotonic() - started >= patience_s
            if not retryable(exc) or late:
                raise
            if on_retry is not None:
                on_retry()
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.5)
