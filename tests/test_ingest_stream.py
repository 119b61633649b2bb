"""The streamed ingest: records written chunk by chunk in one transaction, kept nowhere.

A TalkVid manifest is read record by record (``TalkvidReader``) and written in chunks;
the plan's items are the stored rows, parsed again only for the items that run. These
tests pin what that must not change: all or nothing, the same rows as a list ingest,
and an unchanged content recognised without a second copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import talkforge.manifests as manifests
from storage.catalog import Catalog
from tasks.download.datasets import DatasetSource, read_dataset, stream_dataset
from tasks.download.talkvid import TalkvidReader, read_talkvid
from tests.catalog_helpers import write_talkvid_manifest


def _rows(catalog: Catalog) -> list[tuple]:
    table = catalog.query(
        "SELECT clip_id, status, record_sha256, record_json FROM current_manifest ORDER BY clip_id"
    )
    return [tuple(r.values()) for r in table.to_pylist()]


def test_the_reader_streams_what_read_talkvid_lists(tmp_path: Path) -> None:
    path = write_talkvid_manifest(tmp_path / "m.json", 30)
    listed = read_talkvid(path)
    reader = TalkvidReader(path)
    assert reader.summary is None
    assert list(reader) == listed.clips and reader.summary == listed.summary
    with pytest.raises(RuntimeError, match="iterated once"):
        list(reader)


def test_a_streamed_ingest_writes_the_rows_of_a_listed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifests, "CHUNK_ROWS", 7)  # several chunks of 30 records
    source = DatasetSource(
        kind="talkvid", metadata=str(write_talkvid_manifest(tmp_path / "m.json", 30))
    )
    streamed, listed = Catalog(tmp_path / "a"), Catalog(tmp_path / "b")
    manifest = stream_dataset(source)
    assert isinstance(manifest.records, Iterator)
    result = manifests.ingest_manifest(streamed, manifest, "r1", "fp", None)
    assert manifest.summary["clips"] == 30.0  # complete once the records are consumed
    (other,) = manifests.record_manifests(listed, [read_dataset(source)], "r1")
    assert (result.clips, result.written, round(result.hours, 6)) == (
        other.clips,
        True,
        round(other.hours, 6),
    )
    assert _rows(streamed) == _rows(listed) and len(_rows(streamed)) == 30
    digest = "SELECT content_sha256, clips, summary_json FROM current_datasets"
    assert streamed.query(digest).to_pylist() == listed.query(digest).to_pylist()


def test_a_stream_that_breaks_midway_leaves_no_partial_ingest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifests, "CHUNK_ROWS", 5)
    source = DatasetSource(
        kind="talkvid", metadata=str(write_talkvid_manifest(tmp_path / "m.json", 20))
    )
    manifest = stream_dataset(source)
    records = manifest.records

    def breaking() -> Iterator:
        for i, record in enumerate(records):
            if i == 12:  # two chunks already converted and appended
                raise OSError("disk went away")
            yield record

    manifest.records = breaking()
    catalog = Catalog(tmp_path / "cat")
    with pytest.raises(OSError, match="disk went away"):
        manifests.ingest_manifest(catalog, manifest, "r1", "fp", None)
    counts = "SELECT (SELECT count(*) FROM manifest) AS m, (SELECT count(*) FROM datasets) AS d"
    assert catalog.query(counts).to_pylist() == [{"m": 0, "d": 0}]


def test_same_content_under_a_new_fingerprint_writes_only_the_fingerprint(tmp_path: Path) -> None:
    source = DatasetSource(
        kind="talkvid", metadata=str(write_talkvid_manifest(tmp_path / "m.json", 12))
    )
    catalog = Catalog(tmp_path / "cat")
    first = manifests.ingest_manifest(catalog, stream_dataset(source), "r1", "fp-old", None)
    previous = manifests._current_ingests(catalog)["talkvid"]
    again = manifests.ingest_manifest(catalog, stream_dataset(source), "r2", "fp-new", previous)
    assert (again.ingest_id, again.written, again.clips) == (first.ingest_id, False, 12)
    rows = catalog.query(
        "SELECT (SELECT count(*) FROM manifest) AS m, (SELECT count(*) FROM datasets) AS d"
    ).to_pylist()
    assert rows == [{"m": 12, "d": 2}]  # no second copy of the rows
    current = manifests._current_ingests(catalog)["talkvid"]
    assert (current["ingest_id"], current["source_sha256"]) == (first.ingest_id, "fp-new")
    assert len(_rows(catalog)) == 12
    same = manifests.ingest_manifest(catalog, stream_dataset(source), "r3", "fp-new", current)
    assert not same.written
    assert catalog.query("SELECT count(*) AS d FROM datasets").to_pylist() == [{"d": 2}]
