"""Ingest: the datasets' published metadata into the catalog, before anything is fetched.

Every dataset read by the source stage lands in two catalog tables: ``datasets`` (one row
per ingest: licence, metadata files and their sha256, counts, the reader's summary) and
``manifest`` (one row per clip, or per metadata row that could not become a clip, with the
fields ops ask about: duration, declared resolution and fps, speaker, language, person and
quality annotations). ``talkforge sql`` then answers "hours per dataset", "clips per
speaker" or "language mix" from ``current_manifest`` / ``manifest_summary`` without a single
download, and ``clip_progress`` joins every manifest clip to its download status.

An ingest is keyed by the metadata files' own sha256 plus the per-record hashes the
source stage uses as its item keys (so no record is hashed twice): re-reading unchanged
metadata writes nothing, while a new release, a changed URL template or a reader fix
writes a new version that supersedes the old one in the ``current_*`` views. Metadata
whose files, settings and reader are unchanged (the source fingerprint) is not even read.

Memory at TalkVid's 188 k records: the ingest streams (:func:`ingest_manifest`): records
are converted, hashed and appended as columnar chunks, so only one chunk is ever held as
objects; the plan's items are then the stored rows (:class:`StoredRecord`, three strings),
and a record is parsed again only when its item runs, a shard at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from storage.catalog import Catalog, to_arrow
from talkforge.plan import RunOptions, StagePlan, now_utc
from tasks.base import (
    FailureKind,
    ItemFailure,
    ItemInputs,
    ManifestSource,
    SourceManifest,
    SourceStage,
    StageEnv,
    stable_hash,
)
from tasks.records import SourceClip

if TYPE_CHECKING:
    from talkforge.candidates import Candidates


@dataclass(frozen=True)
class IngestResult:
    dataset: str
    ingest_id: str
    written: bool  # False: the same content was already the current ingest
    clips: int
    problems: int
    hours: float
    licence: str


def record_hash(record: SourceClip) -> str:
    """The content hash of one record: the source stage's key material (computed once)."""
    return stable_hash(record.model_dump(mode="json", exclude_defaults=True))


def content_hash(manifest: SourceManifest, record_hashes: Iterable[str]) -> str:
    """The ingest's identity: metadata files' sha256, dataset terms, per-record hashes.

    ``metadata_sha256`` is the files' own checksum; the per-record hashes add what the
    files alone do not say (URL template, a reader fix). The ingest computes the record
    hashes while it writes the rows, and the same hashes key the source stage's items.
    """
    digest = hashlib.sha256()
    for h in record_hashes:
        digest.update(h.encode())
    problems = [(raw_id, str(f.kind), f.message) for raw_id, f in manifest.problems]
    return stable_hash(
        [
            manifest.dataset,
            manifest.kind,
            manifest.licence,
            manifest.metadata_sha256,
            digest.hexdigest(),
            problems,
        ]
    )


def clip_row(clip: SourceClip) -> dict[str, Any]:
    """The ``manifest`` table row of one clip."""
    celeb, talk = clip.celebvhq, clip.talkvid
    return {
        "dataset": clip.dataset,
        "clip_id": clip.clip_id,
        "status": "ok",
        "subset": clip.subset,
        "source_id": clip.source_id,
        "url": clip.url,
        "start_s": clip.start_s,
        "end_s": clip.end_s,
        "duration_s": clip.duration_s,
        "declared_width": clip.declared_width,
        "declared_height": clip.declared_height,
        "declared_fps": clip.declared_fps,
        "has_crop": clip.crop is not None or clip.bbox is not None,
        "speaker": clip.speaker,
        "language": clip.language,
        "gender": talk.gender if talk else None,
        "age_group": talk.age_group if talk else None,
        "ethnicity": talk.ethnicity if talk else None,
        "category": talk.category if talk else None,
        "emotion": celeb.emotion if celeb else None,
        "appearance": list(celeb.appearance) if celeb else None,
        "actions": list(celeb.actions) if celeb else None,
        "dover_score": talk.dover_score if talk else None,
        "cotracker_ratio": talk.cotracker_ratio if talk else None,
        "head_detail_json": json.dumps(talk.head_detail, sort_keys=True) if talk else None,
    }


def record_manifests(
    catalog: Catalog,
    manifests: list[SourceManifest],
    run_id: str = "",
    fingerprints: dict[str, str] | None = None,
) -> list[IngestResult]:
    """:func:`ingest_manifest` for each of ``manifests`` (``fingerprints``: dataset ->
    :attr:`ManifestSource.fingerprint`, stored so the next plan can skip an unchanged
    file)."""
    results = []
    for manifest in manifests:
        previous = _current_ingests(catalog).get(manifest.dataset)
        source = (fingerprints or {}).get(manifest.dataset, "")
        results.append(ingest_manifest(catalog, manifest, run_id, source, previous))
    return results


class _SameContent(Exception):
    """Aborts an ingest transaction whose content equals the current ingest's."""


def ingest_manifest(
    catalog: Catalog,
    manifest: SourceManifest,
    run_id: str,
    source: str,
    previous: dict[str, Any] | None,
) -> IngestResult:
    """Write ``manifest`` as a new ingest of its dataset, streaming its records.

    One transaction: ``manifest`` rows in arrow chunks of :data:`CHUNK_ROWS` records (each
    record hashed once, as it is written), then its problems and its ``datasets`` row, so a
    crash leaves no partial ingest. Only the chunk being converted is held as Python
    objects; the transaction holds the columnar chunks until it commits. When the content
    hash equals ``previous`` (the dataset's current ingest) the transaction is abandoned:
    nothing is written, except a ``datasets`` row carrying the new ``source`` fingerprint
    when only that changed (say, a reader edit that reads to the same records), so the
    next plan does not parse the file again.
    """
    ingest_id = uuid.uuid4().hex
    hashes: list[str] = []
    duration_s = 0.0
    try:
        with catalog.transaction(run_id) as tx:
            for chunk in _chunks(manifest.records, CHUNK_ROWS):
                chunk_hashes = [record_hash(r) for r in chunk]
                tx.append("manifest", _clip_rows(chunk, chunk_hashes, ingest_id))
                hashes += chunk_hashes
                duration_s += sum(r.duration_s for r in chunk)
            digest = content_hash(manifest, hashes)
            if previous is not None and previous["content_sha256"] == digest:
                raise _SameContent
            tx.append("manifest", _problem_rows(manifest, ingest_id))
            row = _dataset_row(manifest, ingest_id, len(hashes), digest, source, run_id)
            tx.append("datasets", [row])
        written = True
    except _SameContent:
        assert previous is not None
        ingest_id, written = previous["ingest_id"], False
        if (previous["source_sha256"] or "") != source:
            digest = previous["content_sha256"]
            row = _dataset_row(manifest, ingest_id, len(hashes), digest, source, run_id)
            catalog.append("datasets", [row])
    return IngestResult(
        manifest.dataset,
        ingest_id,
        written,
        len(hashes),
        len(manifest.problems),
        duration_s / 3600,
        manifest.licence,
    )


def _current_ingests(catalog: Catalog) -> dict[str, dict[str, Any]]:
    rows = catalog.query(
        "SELECT dataset, ingest_id, content_sha256, source_sha256, kind, licence, "
        "metadata_files, metadata_sha256, warnings FROM current_datasets"
    ).to_pylist()
    return {r["dataset"]: r for r in rows}


CHUNK_ROWS = 20_000


def _chunks(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _clip_rows(chunk: list[SourceClip], hashes: list[str], ingest_id: str) -> pa.Table:
    return to_arrow(
        "manifest",
        (
            {
                **clip_row(r),
                "ingest_id": ingest_id,
                "record_sha256": h,
                "record_json": r.model_dump_json(),
            }
            for r, h in zip(chunk, hashes, strict=True)
        ),
    )


def _problem_rows(manifest: SourceManifest, ingest_id: str) -> list[dict[str, Any]]:
    return [
        {
            "ingest_id": ingest_id,
            "dataset": manifest.dataset,
            "clip_id": raw_id,
            "status": str(failure.kind),
            "error_kind": str(failure.kind),
            "error_message": failure.message,
        }
        for raw_id, failure in manifest.problems
    ]


def _dataset_row(
    manifest: SourceManifest, ingest_id: str, clips: int, digest: str, source: str, run_id: str
) -> dict[str, Any]:
    return {
        "ingest_id": ingest_id,
        "ingested_at": now_utc(),
        "run_id": run_id,
        "dataset": manifest.dataset,
        "kind": manifest.kind,
        "licence": manifest.licence,
        "metadata_files": manifest.metadata_files,
        "metadata_sha256": manifest.metadata_sha256,
        "content_sha256": digest,
        "source_sha256": source,
        "clips": clips,
        "problems": len(manifest.problems),
        "warnings": manifest.warnings,
        "summary_json": json.dumps(manifest.summary, sort_keys=True),
    }


@dataclass(frozen=True)
class StoredRecord:
    """A manifest record as the catalog stored it: its JSON is fetched (and parsed) only
    if its item runs (:func:`stored_records`)."""

    clip_id: str
    sha256: str
    ingest_id: str


def stored_records(catalog: Catalog, wanted: list[StoredRecord]) -> dict[str, SourceClip]:
    """clip id -> the parsed record of each of ``wanted``, in one query."""
    if not wanted:
        return {}
    table = catalog.query(
        "SELECT clip_id, record_json FROM manifest SEMI JOIN wanted USING (ingest_id, clip_id)",
        tables={
            "wanted": pa.table(
                {
                    "ingest_id": pa.array([r.ingest_id for r in wanted], pa.string()),
                    "clip_id": pa.array([r.clip_id for r in wanted], pa.string()),
                }
            )
        },
    )
    return {
        clip_id: SourceClip.model_validate_json(text)
        for clip_id, text in zip(
            table.column("clip_id").to_pylist(),
            table.column("record_json").to_pylist(),
            strict=True,
        )
    }


def read_sources(
    catalog: Catalog, sources: list[ManifestSource], run_id: str, *, record: bool = True
) -> tuple[list[SourceManifest], dict[str, list[str]], list[IngestResult]]:
    """Every source's manifest, its records' hashes, and what was ingested.

    A source whose fingerprint equals the one stored with its dataset's current ingest is
    not read. Any other is ingested (:func:`ingest_manifest`, streamed where the source
    can: :attr:`ManifestSource.stream`), so no manifest's records are ever all held as
    objects: every source's manifest then comes back from the catalog as
    :class:`StoredRecord` rows (one query for all), parsed only for items that run
    (:func:`stored_records`). A dry run (``record=False``) writes nothing: it reads the
    changed sources into lists and hashes them.
    """
    current = _current_ingests(catalog)
    results: dict[str, IngestResult] = {}
    read: dict[str, SourceManifest] = {}
    for source in sources:
        previous = current.get(source.dataset)
        if source.fingerprint and previous and previous["source_sha256"] == source.fingerprint:
            continue
        if not record:
            read[source.dataset] = source.read()
            continue
        manifest = (source.stream or source.read)()
        results[source.dataset] = ingest_manifest(
            catalog, manifest, run_id, source.fingerprint, previous
        )
        current = _current_ingests(catalog)
    stored = {s.dataset: current[s.dataset] for s in sources if s.dataset not in read}
    rows = _stored_rows(catalog, [info["ingest_id"] for info in stored.values()])
    manifests, hashes = [], {}
    for source in sources:
        if source.dataset in read:
            manifest = read[source.dataset]
            hashes[manifest.dataset] = [record_hash(r) for r in manifest.records]
        else:
            manifest = _stored_manifest(stored[source.dataset], rows.get(source.dataset, []))
            hashes[manifest.dataset] = [r.sha256 for r in manifest.records]
        manifests.append(manifest)
        if source.dataset not in results:
            hours = sum(r["duration_s"] or 0.0 for r in rows.get(source.dataset, [])) / 3600
            results[source.dataset] = IngestResult(
                manifest.dataset,
                "" if source.dataset in read else stored[source.dataset]["ingest_id"],
                False,
                len(manifest.records),
                len(manifest.problems),
                hours,
                manifest.licence,
            )
    return manifests, hashes, [results[s.dataset] for s in sources]


def _stored_rows(catalog: Catalog, ingest_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    if not ingest_ids:
        return {}
    table = catalog.query(
        "SELECT ingest_id, dataset, clip_id, status, error_kind, error_message, duration_s, "
        "record_sha256 FROM manifest SEMI JOIN wanted USING (ingest_id)",
        tables={"wanted": pa.table({"ingest_id": pa.array(ingest_ids, pa.string())})},
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        out.setdefault(row["dataset"], []).append(row)
    return out


def _stored_manifest(info: dict[str, Any], rows: list[dict[str, Any]]) -> SourceManifest:
    records = [
        StoredRecord(r["clip_id"], r["record_sha256"], r["ingest_id"])
        for r in rows
        if r["status"] == "ok"
    ]
    problems = [
        (r["clip_id"], ItemFailure(FailureKind(r["error_kind"]), r["error_message"]))
        for r in rows
        if r["status"] != "ok"
    ]
    return SourceManifest(
        dataset=info["dataset"],
        kind=info["kind"],
        licence=info["licence"],
        metadata_files=list(info["metadata_files"] or []),
        metadata_sha256=info["metadata_sha256"],
        records=records,
        problems=problems,
        warnings=list(info["warnings"] or []),
    )


def source_candidates(
    catalog: Catalog,
    stage_cls: type[SourceStage[Any]],
    cfg: Any,
    env: StageEnv,
    plan: StagePlan,
    options: RunOptions,
    *,
    record: bool = True,
) -> Candidates:
    """The source stage's items: its manifests' records, each keyed by its content hash
    (key material ``{"source": <record sha256>}``).

    An unchanged manifest (same fingerprint) is not read at all (:func:`read_sources`);
    a changed one is ingested first, every record hashed once as it is written, the same
    hashes identifying the ingest and keying the items; either way the items are the
    stored rows, and a record is parsed again only when its item runs. ``record=False``
    (a dry run) writes nothing and keeps the changed manifests' records in memory (their
    datasets in ``plan.sources_read``).
    """
    from talkforge.candidates import Candidates

    sources = stage_cls.manifest_sources(cfg, env)
    manifests, hashes, results = read_sources(catalog, sources, env.run_id, record=record)
    plan.sources_read = [r.dataset for r in results if not r.ingest_id]
    hash_of = {
        id(r): h for m in manifests for r, h in zip(m.records, hashes[m.dataset], strict=True)
    }
    records, problems = stage_cls.discover(manifests)
    plan.discovery_failures = problems
    found = sorted(records, key=lambda r: r.clip_id)
    found = found[: options.limit] if options.limit else found
    by_id = {r.clip_id: r for r in found}
    items = pa.table(
        {
            "item_id": pa.array(list(by_id), pa.string()),
            "m_0": pa.array([hash_of[id(r)] for r in found], pa.string()),
        }
    )

    def build(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, ItemInputs]:
        chosen = [by_id[item_id] for item_id, _ in rows]
        parsed = stored_records(catalog, [r for r in chosen if isinstance(r, StoredRecord)])
        # built from already validated records: no second validation (188 k items)
        return {
            r.clip_id: ItemInputs.model_construct(
                item_id=r.clip_id, source=parsed[r.clip_id] if isinstance(r, StoredRecord) else r
            )
            for r in chosen
        }

    return Candidates(
        build=build,
        sql="SELECT item_id, m_0 FROM source_items ORDER BY item_id",
        tables={"source_items": items},
        columns=["source"],
    )
