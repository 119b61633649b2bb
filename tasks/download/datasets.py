"""Which datasets the download stage reads, and one reader call per dataset kind.

A :class:`DatasetSource` names a dataset kind (``hdtf``, ``celebvhq``, ``talkvid``), where
its published metadata lies (a folder, or for the JSON datasets the file itself), how to
build a source URL from a video id (YouTube by default; a mirror, loopback server or
``file://`` folder otherwise) and its licence terms (the published terms by default).
:func:`read_dataset` runs the matching reader and returns a
:class:`~tasks.base.SourceManifest` fingerprinted by the bytes of the files it read, so an
unchanged metadata release is recognised and not re-ingested.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from storage.store import UnsafeIdError, safe_id, sha256_file
from tasks.base import FailureKind, ItemFailure, SourceManifest, stable_hash
from tasks.download.celebvhq import CELEBVHQ_LICENCE, INFO_FILE, CelebvhqManifest, read_celebvhq
from tasks.download.hdtf import HDTF_LICENCE, HDTF_SUBSETS, HdtfManifest, read_hdtf
from tasks.download.talkvid import (
    TALKVID_LICENCE,
    TalkvidManifest,
    TalkvidReader,
    read_talkvid,
    talkvid_metadata_file,
)

DatasetKind = Literal["hdtf", "celebvhq", "talkvid"]
LICENCES: dict[str, str] = {
    "hdtf": HDTF_LICENCE,
    "celebvhq": CELEBVHQ_LICENCE,
    "talkvid": TALKVID_LICENCE,
}


class DatasetSource(BaseModel):
    """One dataset to read. ``metadata`` is absolute or relative to the working dir."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DatasetKind
    metadata: str  # HDTF: the HDTF_dataset folder; others: the JSON file or its folder
    name: str | None = None  # dataset label and clip-id prefix; default: the kind
    subsets: list[str] | None = None  # HDTF only; default RD, WDA, WRA
    url_template: str | None = None  # e.g. "http://mirror/{id}.mp4"; None: YouTube watch URL
    licence: str | None = None  # default: the dataset's published terms (LICENCES)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                safe_id(value)
            except UnsafeIdError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("url_template")
    @classmethod
    def _template_has_id(cls, value: str | None) -> str | None:
        if value is not None and "{id}" not in value:
            raise ValueError("url_template must contain '{id}' (the video id)")
        return value

    @model_validator(mode="after")
    def _subsets_only_for_hdtf(self) -> DatasetSource:
        if self.subsets is not None and self.kind != "hdtf":
            raise ValueError(f"subsets apply to hdtf only, not {self.kind}")
        return self

    @property
    def dataset(self) -> str:
        return self.name or self.kind

    @property
    def terms(self) -> str:
        return self.licence or LICENCES[self.kind]


def metadata_files(source: DatasetSource) -> list[Path]:
    """The files a reader of ``source`` reads (what the manifest fingerprint covers)."""
    root = Path(source.metadata).expanduser()
    if root.is_file():
        return [root]
    if source.kind == "hdtf":
        subsets = source.subsets or list(HDTF_SUBSETS)
        return sorted(p for s in subsets for p in root.glob(f"{s}_*.txt"))
    if source.kind == "celebvhq":
        return [root / INFO_FILE]
    return [talkvid_metadata_file(root)]


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (missing files hash as absent)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        if path.is_file():
            digest.update(bytes.fromhex(sha256_file(path)))  # streamed: files can be 300 MB
    return digest.hexdigest()


def source_fingerprint(source: DatasetSource) -> str:
    """Everything a manifest is made from: the dataset's settings, the metadata files'
    bytes and the readers' code. Equal fingerprints read to equal manifests, so the
    planner can use the rows stored at the last ingest instead of parsing again."""
    return stable_hash(
        [source.model_dump(mode="json"), fingerprint_files(metadata_files(source)), _reader_code()]
    )


@functools.cache
def _reader_code() -> str:
    """sha256 of the readers' source files: a reader fix re-reads unchanged metadata."""
    from tasks import records
    from tasks.download import celebvhq, hdtf, json_input, talkvid

    modules = (sys.modules[__name__], celebvhq, hdtf, talkvid, json_input, records)
    return fingerprint_files([Path(m.__file__) for m in modules if m.__file__])


def read_dataset(source: DatasetSource) -> SourceManifest:
    """Run the reader of ``source.kind``: every record in a list.

    A missing metadata file (or an ambiguous folder) is a configuration error and raises.
    A file whose content cannot be read as a whole (truncated or invalid JSON, a top level
    of the wrong type) becomes one ``BAD_METADATA`` problem ``<dataset>-#metadata`` naming
    the file and the position, with no records: the other datasets of the run go on.
    """
    return _manifest(source, stream=False)


def stream_dataset(source: DatasetSource) -> SourceManifest:
    """:func:`read_dataset` for an ingest that streams: a TalkVid manifest's ``records`` is
    a one-shot iterator (:class:`~tasks.download.talkvid.TalkvidReader`) whose
    ``problems``, ``warnings`` and ``summary`` are complete once it is exhausted; the other
    kinds (at most tens of thousands of records) come as lists."""
    return _manifest(source, stream=True)


def _manifest(source: DatasetSource, *, stream: bool) -> SourceManifest:
    root = Path(source.metadata).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{source.kind} metadata not found: {root}")
    dataset, licence = source.dataset, source.terms
    files = metadata_files(source)
    manifest = SourceManifest(
        dataset=dataset,
        kind=source.kind,
        licence=licence,
        metadata_files=[str(p.resolve()) for p in files],
        metadata_sha256=fingerprint_files(files),
        records=[],
    )
    try:
        if stream and source.kind == "talkvid":
            reader = TalkvidReader(root, source.url_template, dataset=dataset, licence=licence)
            manifest.records = _streamed(reader, manifest)
            manifest.problems, manifest.warnings = reader.problems, reader.warnings
            return manifest
        result = _read(source, root)
    except ValueError as exc:
        failure = ItemFailure(FailureKind.BAD_METADATA, str(exc))
        result = _Unreadable(clips=[], problems=[(f"{dataset}-#metadata", failure)])
    manifest.records = list(result.clips)
    manifest.problems = list(result.problems)
    manifest.warnings = list(result.warnings)
    manifest.summary = _summary(result.summary)
    return manifest


def _streamed(reader: TalkvidReader, manifest: SourceManifest) -> Iterator[Any]:
    yield from reader
    manifest.summary.update(_summary(reader.summary))


def _summary(summary: Any) -> dict[str, float]:
    values = dataclasses.asdict(summary) if summary is not None else {}
    return {k: float(v) for k, v in values.items()}


@dataclasses.dataclass
class _Unreadable:
    clips: list[Any]
    problems: list[tuple[str, ItemFailure]]
    warnings: list[str] = dataclasses.field(default_factory=list)
    summary: None = None


def _read(source: DatasetSource, root: Path) -> HdtfManifest | CelebvhqManifest | TalkvidManifest:
    dataset, licence = source.dataset, source.terms
    if source.kind == "hdtf":
        subsets = tuple(source.subsets or HDTF_SUBSETS)
        return read_hdtf(root, subsets, source.url_template, dataset=dataset, licence=licence)
    if source.kind == "celebvhq":
        return read_celebvhq(root, source.url_template, dataset=dataset, licence=licence)
    return read_talkvid(root, source.url_template, dataset=dataset, licence=licence)
