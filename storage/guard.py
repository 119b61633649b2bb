"""The read-only SQL guard of ``talkforge sql`` / dashboards.

Four locks, each enough against some attack and together against all we know of:

1. the text must parse as exactly one SELECT (no DML/DDL, ATTACH, COPY, SET, CALL, PRAGMA);
2. no function of the lake or its metadata back end, nor ``query()``/``query_table()``
   (which would run SQL text this check never saw): ``ducklake_*`` maintenance functions
   (expire snapshots, flush, add files), ``sqlite_*`` / ``postgres_*`` scanners and
   ``postgres_execute`` are refused by name, found in duckdb's own parse tree;
3. the lake is attached ``READ_ONLY`` in that connection, so even a function missed by (2)
   cannot write the metadata database;
4. ``enable_external_access=false`` with ``allowed_directories`` = the catalog's data folder,
   then ``lock_configuration``: no other file, no network, no way to lift the settings.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

DENIED_PREFIXES = ("ducklake_", "sqlite_", "postgres_", "pg_")
DENIED_FUNCTIONS = frozenset({"query", "query_table"})


class ReadOnlyQueryError(ValueError):
    """A query that is not a plain SELECT, refused by :meth:`Catalog.query_readonly`."""


def check_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` unless ``sql`` is one SELECT using no denied function."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlyQueryError(f"cannot parse query: {exc}") from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ReadOnlyQueryError("only a single SELECT statement is allowed")
    tree = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    parsed = json.loads(tree[0]) if tree else {"error": True}
    if parsed.get("error"):
        raise ReadOnlyQueryError(f"cannot parse query: {parsed.get('error_message', '')}")
    for name in _function_names(parsed):
        low = name.lower()
        if low in DENIED_FUNCTIONS or low.startswith(DENIED_PREFIXES):
            raise ReadOnlyQueryError(f"function {name}() is not allowed in read-only SQL")


def _function_names(node: Any) -> list[str]:
    out: list[str] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            name = cur.get("function_name")
            if isinstance(name, str):
                out.append(name)
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return out


def lock_down(con: duckdb.DuckDBPyConnection, allowed_dirs: list[str]) -> None:
    """Forbid every file and network access outside ``allowed_dirs``, then lock the config."""
    quoted = ", ".join("'" + d.replace("'", "''") + "'" for d in allowed_dirs)
    con.execute(f"SET allowed_directories=[{quoted}]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
