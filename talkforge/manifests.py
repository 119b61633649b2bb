"""Ingest: the datasets' published metadata into the catalog, before anything is fetched.

Every dataset read by the source stage lands in two catalog tables: ``datasets`` (one row
per ingest: licence, metadata files and their sha256, counts, the reader's summary) and
``manifest`` (one row per clip, or per metadata row that could not become a clip, with the
fields ops ask about: duration, declared resolution and fps, speaker, language, person and
quality annotations). ``talkforge sql`` then answers "hours per dataset", "clips per
speaker" or "language mix" from ``current_manifest`` / ``manifest_summary`` without a single
download, and ``clip_progress`` joins every manifest clip to its download status.

An ingest is keyed by the metadata files' own sha256 plus the per-record hashes the
source stage computes anyway for its item keys (so no record is hashed twice): re-reading
unchanged metadata writes nothing, while a new release, a changed URL template or a reader
fix writes a new version that supersedes the old one in the ``current_*`` views.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from storage.catalog import Catalog, to_arrow
from talkforge.plan import RunOptions, StagePlan, now_utc
from tasks.base import ItemInputs, SourceManifest, SourceStage, StageEnv, stable_hash
from tasks.records import SourceClip

if TYPE_CHECKING:
    from talkforge.candidates import Candidate


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


def content_hash(manifest: SourceManifest, record_hashes: list[str] | None = None) -> str:
    """The ingest's identity: metadata files' sha256, dataset terms, per-record hashes.

    ``metadata_sha256`` is the files' own checksum; the per-record hashes add what the
    files alone do not say (URL template, a reader fix). Callers that already hashed the
    records for item keys pass ``record_hashes`` so nothing is hashed twice.
    """
    hashes = record_hashes if record_hashes is not None else map(record_hash, manifest.records)
    digest = hashlib.sha256()
    for h in hashes:
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
    record_hashes: dict[str, list[str]] | None = None,
) -> list[IngestResult]:
    """Write each manifest whose content differs from its dataset's current ingest.

    One query reads every dataset's current ingest; a changed manifest is written as one
    transaction (``manifest`` rows in chunks of :data:`CHUNK_ROWS`, then its ``datasets``
    row), so memory holds one chunk of rows at a time and a crash leaves no partial ingest.
    ``record_hashes`` (dataset -> per-record hashes) skips re-hashing records.
    """
    current = {
        r["dataset"]: r
        for r in catalog.query(
            "SELECT dataset, ingest_id, content_sha256 FROM current_datasets"
        ).to_pylist()
    }
    results = []
    for manifest in manifests:
        digest = content_hash(manifest, (record_hashes or {}).get(manifest.dataset))
        hours = sum(getattr(r, "duration_s", 0.0) for r in manifest.records) / 3600
        previous = current.get(manifest.dataset)
        unchanged = previous is not None and previous["content_sha256"] == digest
        ingest_id = previous["ingest_id"] if unchanged else uuid.uuid4().hex
        if not unchanged:
            _write_ingest(catalog, manifest, ingest_id, digest, run_id)
        results.append(
            IngestResult(
                manifest.dataset,
                ingest_id,
                not unchanged,
                len(manifest.records),
                len(manifest.problems),
                hours,
                manifest.licence,
            )
        )
    return results


CHUNK_ROWS = 20_000


def _write_ingest(
    catalog: Catalog, manifest: SourceManifest, ingest_id: str, digest: str, run_id: str
) -> None:
    with catalog.transaction(run_id) as tx:
        records = manifest.records
        for start in range(0, len(records), CHUNK_ROWS):
            tx.append(
                "manifest",
                to_arrow(
                    "manifest",
                    (
                        {**clip_row(r), "ingest_id": ingest_id}
                        for r in records[start : start + CHUNK_ROWS]
                    ),
                ),
            )
        tx.append(
            "manifest",
            [
                {
                    "ingest_id": ingest_id,
                    "dataset": manifest.dataset,
                    "clip_id": raw_id,
                    "status": str(failure.kind),
                    "error_kind": str(failure.kind),
                    "error_message": failure.message,
                }
                for raw_id, failure in manifest.problems
            ],
        )
        tx.append(
            "datasets",
            [
                {
                    "ingest_id": ingest_id,
                    "ingested_at": now_utc(),
                    "run_id": run_id,
                    "dataset": manifest.dataset,
                    "kind": manifest.kind,
                    "licence": manifest.licence,
                    "metadata_files": manifest.metadata_files,
                    "metadata_sha256": manifest.metadata_sha256,
                    "content_sha256": digest,
                    "clips": len(manifest.records),
                    "problems": len(manifest.problems),
                    "warnings": manifest.warnings,
                    "summary_json": json.dumps(manifest.summary, sort_keys=True),
                }
            ],
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
) -> list[Candidate]:
    """The source stage's items: its manifests' records, each keyed by its content hash.

    Every record is hashed once; the same hashes identify the ingest (unchanged content:
    nothing written) and key the items. ``record=False`` (a dry run) writes nothing.
    """
    from talkforge.candidates import Candidate

    manifests = stage_cls.read_manifests(cfg, env)
    hashes = {m.dataset: [record_hash(r) for r in m.records] for m in manifests}
    if record:
        record_manifests(catalog, manifests, env.run_id, hashes)
    hash_of = {
        id(r): h for m in manifests for r, h in zip(m.records, hashes[m.dataset], strict=True)
    }
    records, problems = stage_cls.discover(manifests)
    plan.discovery_failures = problems
    found = sorted(records, key=lambda r: r.clip_id)
    found = found[: options.limit] if options.limit else found
    return [
        Candidate(
            r.clip_id, {"source": hash_of[id(r)]}, partial(ItemInputs, item_id=r.clip_id, source=r)
        )
        for r in found
    ]
