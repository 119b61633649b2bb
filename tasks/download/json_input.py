"""Reading published JSON metadata whose bytes may be bad in places.

The file is decoded with ``surrogateescape``: an invalid UTF-8 byte inside a string value
survives parsing as a lone surrogate (``\\udc80``–``\\udcff``) instead of failing the
whole file, so a reader can reject just the record that holds it
(:func:`first_undecodable`) while every other record goes on. A byte that breaks the JSON
structure itself, or truncated JSON, still fails the file, with line and column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_ESCAPED = re.compile("[\udc80-\udcff]")


def load_json(file: Path, what: str, **kwargs: Any) -> tuple[Any, bool]:
    """Parse ``file`` into (value, whether any string held an invalid UTF-8 byte);
    ``ValueError`` naming the file and the position if it is not JSON."""
    text = file.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    try:
        return json.loads(text, **kwargs), _ESCAPED.search(text) is not None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{file}: not a {what} file (invalid JSON at line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg})"
        ) from exc


def first_undecodable(value: Any, prefix: str = "") -> str | None:
    """``"field: byte 0xNN"`` for the first key or string inside ``value`` that held an
    invalid UTF-8 byte, else ``None``."""
    if isinstance(value, str):
        m = _ESCAPED.search(value)
        return f"{prefix or 'value'}: byte 0x{ord(m.group()) - 0xDC00:02x}" if m else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            found = first_undecodable(key, f"key {name!r}") or first_undecodable(item, name)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = first_undecodable(item, f"{prefix}[{index}]")
            if found:
                return found
    return None


def printable(text: str) -> str:
    """``text`` with escaped bad bytes shown as U+FFFD (safe to store as UTF-8)."""
    return _ESCAPED.sub("\ufffd", text)
