"""Byte-reproducible safetensors files.

``safetensors`` keeps the header's ``__metadata__`` in a hash map whose iteration order is
seeded per process, so the same tensors and metadata saved twice give different bytes, and
therefore a different sha256: an artifact's digest would not identify its content. Here
the header is rewritten with sorted keys (padded with spaces to 8 bytes, as the format
allows) before the file is written, so equal content gives equal bytes in every process.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save

_ALIGN = 8


def canonical_bytes(blob: bytes) -> bytes:
    """``blob`` (a serialized safetensors file) with its JSON header in canonical order."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    meta = header.get("__metadata__")
    if meta is not None:
        header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + blob[8 + size :]


def save_file(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Drop-in for :func:`safetensors.torch.save_file` whose bytes depend only on content."""
    blob = save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    Path(path).write_bytes(canonical_bytes(blob))
