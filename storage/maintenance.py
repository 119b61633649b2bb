"""Keeping the catalog's files in shape: compaction, retention, file statistics.

Mixed into :class:`storage.catalog.Catalog` (``catalog.compact()``, ``catalog.vacuum()``):
every operation here is a DuckLake maintenance call that commits on its own, so it is safe
beside running writers — a writer's commit lands either before it (and is compacted) or
after it (and stays as written). Nothing here changes a row, only the files holding them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import duckdb

from storage.lake import LAKE, CatalogConfig, is_retryable, retrying, rollback


class Maintenance:
    """Compaction and retention of a catalog (the :class:`~storage.catalog.Catalog` mixin)."""

    config: CatalogConfig
    _lock: threading.RLock
    _shared: Callable[[], duckdb.DuckDBPyConnection]  # this process's read-write connection

    def compact(self) -> dict[str, int]:
        """Flush inlined rows into parquet and merge small files; safe beside writers.

        Both are DuckLake commits of their own: a concurrent writer's commit either lands
        before (and is compacted) or after (and stays as written); no row is lost or
        changed, only the files holding them. Old files stay until :meth:`vacuum`.
        """
        before = self.file_stats()
        with self._lock:
            con = self._shared()
            for call in ("ducklake_flush_inlined_data", "ducklake_merge_adjacent_files"):
                retrying(
                    lambda call=call: con.execute(f"CALL {call}(?)", [LAKE]),
                    self.config.commit_retries,
                    on_retry=lambda: rollback(con),
                    retryable=_maintenance_retryable,
                )
        after = self.file_stats()
        return {
            "files_before": before["files"],
            "inlined_rows_before": before["inlined_rows"],
            "files_after": after["files"],
            "inlined_rows_after": after["inlined_rows"],
        }

    def vacuum(self, older_than_s: float) -> dict[str, int]:
        """Expire snapshots older than ``older_than_s`` and delete files nothing references.

        Time travel to an expired snapshot is no longer possible. Orphaned files (a writer
        killed mid-commit) are removed only when older than an hour, so a commit in flight
        never loses the files it is about to reference.
        """
        age = f"INTERVAL '{int(older_than_s)} seconds'"
        orphan_age = f"INTERVAL '{max(int(older_than_s), 3600)} seconds'"
        with self._lock:
            con = self._shared()
            expired = con.execute(
                f"SELECT count(*) FROM ducklake_expire_snapshots('{LAKE}', "  # noqa: S608
                f"older_than => now() - {age})"
            ).fetchone()
            cleaned = con.execute(
                f"SELECT count(*) FROM ducklake_cleanup_old_files('{LAKE}', "  # noqa: S608
                f"older_than => now() - {age})"
            ).fetchone()
            orphans = con.execute(
                f"SELECT count(*) FROM ducklake_delete_orphaned_files('{LAKE}', "  # noqa: S608
                f"older_than => now() - {orphan_age})"
            ).fetchone()
        return {
            "snapshots_expired": int(expired[0]) if expired else 0,
            "files_deleted": int(cleaned[0]) if cleaned else 0,
            "orphans_deleted": int(orphans[0]) if orphans else 0,
        }

    def file_stats(self) -> dict[str, int]:
        """Data files (max over tables) and inlined rows (all tables) of the current snapshot."""
        with self._lock:
            con = self._shared()
            files = con.execute(
                "SELECT coalesce(max(file_count), 0) FROM ducklake_table_info(?)", [LAKE]
            ).fetchone()
            meta = f"__ducklake_metadata_{LAKE}"
            names = con.execute(
                f"SELECT table_name FROM {meta}.ducklake_inlined_data_tables"  # noqa: S608
            ).fetchall()
            inlined = 0
            if names:  # one query over every inlined-data table (the metadata DB's own names)
                union = " UNION ALL ".join(
                    f"SELECT count(*) AS n FROM {meta}.{name} WHERE end_snapshot IS NULL"  # noqa: S608
                    for (name,) in names
                )
                row = con.execute(f"SELECT sum(n) FROM ({union})").fetchone()  # noqa: S608
                inlined = int(row[0]) if row and row[0] is not None else 0
        return {"files": int(files[0]) if files else 0, "inlined_rows": inlined}

    def maybe_compact(self) -> dict[str, int] | None:
        """Compact when files or inlined rows have piled up past the configured thresholds."""
        stats = self.file_stats()
        if (
            stats["files"] > self.config.compact_after_files
            or stats["inlined_rows"] > self.config.compact_after_inlined_rows
        ):
            return self.compact()
        return None


def _maintenance_retryable(exc: BaseException) -> bool:
    """A conflict, or a maintenance call whose own multi-step commit a concurrent writer
    broke mid-way ("transaction is aborted"): rolled back, it is safe to run again."""
    return is_retryable(exc) or "transaction is aborted" in str(exc).lower()
