"""TalkVid metadata reader: the README record, the official template, and every known trap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from storage.store import safe_id
from tasks.base import FailureKind
from tasks.download.talkvid import TALKVID_LICENCE, read_talkvid
from tasks.records import TalkvidAnnotations
from tests.download_helpers import SHARED

TALKVID_FIXTURES = SHARED / "fixtures" / "metadata" / "talkvid"
TALKVID_README_RECORD = TALKVID_FIXTURES / "README_example_record.DERIVED.json"
TALKVID_TEMPLATE = TALKVID_FIXTURES / "video_hq_0_0_correct.json"
needs_shared = pytest.mark.skipif(
    not TALKVID_README_RECORD.is_file(), reason="../shared TalkVid fixtures not present"
)


def _record(
    record_id: str = "videovideoAAAAAAAAAAA-scene1-scene1",
    link: str = "https://www.youtube.com/watch?v=AAAAAAAAAAA",
    start: Any = 1.0,
    end: Any = 6.0,
    **over: Any,
) -> dict:
    record = {
        "id": record_id,
        "height": 1080,
        "width": 1920,
        "fps": 25.0,
        "start-time": start,
        "start-frame": 0,
        "end-time": end,
        "end-frame": 125,
        "durations": "5.0s",
        "info": {
            "Person ID": "12",
            "Ethnicity": "Asian",
            "Age Group": "19-30",
            "Gender": "Female",
            "Video Link": link,
            "Language": "Chinese",
            "Video Category": "Vlog",
        },
        "description": "a woman talking",
        "dover_scores": 7.5,
        "cotracker_ratio": 0.9,
        "head_detail": {"scores": {"avg_movement": 90.0, "min_movement": 70}},
    }
    record.update(over)
    return record


def _write(tmp_path: Path, data: Any, name: str = "filtered_video_clips.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@needs_shared
def test_readme_record():
    m = read_talkvid(TALKVID_README_RECORD)
    raw = json.loads(TALKVID_README_RECORD.read_text())[0]
    assert m.problems == [] and m.warnings == []
    (clip,) = m.clips
    assert clip.clip_id == "talkvid-videovideoTr6MMsoWAog-scene1-scene1" == safe_id(clip.clip_id)
    assert clip.dataset == "talkvid" and clip.licence == TALKVID_LICENCE
    assert clip.source_id == "Tr6MMsoWAog"
    assert clip.url == "https://www.youtube.com/watch?v=Tr6MMsoWAog"
    assert (clip.start_s, clip.end_s) == (0.1, 5.141666666666667)
    assert (clip.declared_height, clip.declared_width, clip.declared_fps) == (1080, 1920, 24.0)
    assert (clip.speaker, clip.language) == ("597", "English")
    assert clip.talkvid == TalkvidAnnotations(
        person_id="597",
        gender="Male",
        age_group="60+",
        ethnicity="White",
        category="Personal Experience",
        description=raw["description"],
        dover_score=8.9,
        cotracker_ratio=0.9271857142448425,
        head_detail=raw["head_detail"]["scores"],
        declared_duration_s=5.042,
    )
    assert len(clip.talkvid.head_detail) == 10
    s = m.summary
    assert (s.records, s.clips, s.unique_source_ids, s.speakers, s.languages) == (1, 1, 1, 1, 1)
    assert s.duration_s == pytest.approx(5.041666666666667) and s.problems == 0


@needs_shared
def test_official_input_template_is_not_release_metadata():
    """video_hq_0_0_correct.json is the segmentation input template: its empty id is a problem."""
    m = read_talkvid(TALKVID_TEMPLATE)
    assert m.clips == []
    ((raw_id, failure),) = m.problems
    assert raw_id == "talkvid-#0" and failure.kind == FailureKind.BAD_METADATA
    assert "id is missing" in failure.message


def test_hand_made_traps(tmp_path: Path):
    records = [
        _record("r-good"),
        _record("r-zero-start", start=0.0, end=5.0),  # the official downloader drops this
        _record(
            "videovideo-0F1owya2oo-scene20_scene2",
            link="https://www.youtube.com/watch?v=-0F1owya2oo&t=3s",
        ),
        _record("r-lower-link", info={"video_link": "https://youtu.be/_underscore"}),
        _record("../../evil"),
        _record("r-good", start=100.0, end=110.0),  # duplicate id
        _record("r-negative", start=-1.0),
        _record("r-none-start", start=None),
        _record("r-string-start", start="1.0"),
        _record("r-bool-end", end=True),
        _record("r-equal", start=4.0, end=4.0),
        _record("r-inverted", start=9.0, end=3.0),
        _record("r-nan", end=float("nan")),
        _record("r-inf", end=float("inf")),
        _record("r-no-info", info=None),
        _record("r-bad-link", link="https://example.com/watch?v=AAAAAAAAAAA"),
        _record("r-short-id", link="https://www.youtube.com/watch?v=short"),
        {"height": 1080},  # no id at all
        "not a record",
    ]
    no_start = _record("r-missing-start")
    del no_start["start-time"]
    records.append(no_start)
    m = read_talkvid(_write(tmp_path, records))
    clips = {c.clip_id: c for c in m.clips}
    problems = {rid: f for rid, f in m.problems}
    assert all(f.kind == FailureKind.BAD_METADATA and not f.retryable for f in problems.values())
    assert set(clips) == {
        "talkvid-r-good",
        "talkvid-r-zero-start",
        "talkvid-videovideo-0F1owya2oo-scene20_scene2",
        "talkvid-r-lower-link",
    }
    good = clips["talkvid-r-good"]
    assert (good.start_s, good.end_s) == (1.0, 6.0)  # the first of the duplicates wins
    zero = clips["talkvid-r-zero-start"]
    assert (zero.start_s, zero.end_s, zero.duration_s) == (0.0, 5.0, 5.0)
    dash = clips["talkvid-videovideo-0F1owya2oo-scene20_scene2"]
    assert dash.source_id == "-0F1owya2oo"  # from the link, never from the id
    assert dash.url == "https://www.youtube.com/watch?v=-0F1owya2oo"
    lower = clips["talkvid-r-lower-link"]
    assert lower.source_id == "_underscore"
    assert lower.speaker == "_underscore" and lower.language == ""  # no person info given

    def msg(raw_id: str) -> str:
        return problems[raw_id].message

    assert msg("talkvid-r-negative").startswith("filtered_video_clips.json[6]: ")
    assert "unsafe id" in msg("talkvid-../../evil")
    assert "repeats record 0" in msg("talkvid-r-good#dup5")  # keyed apart from the kept clip
    assert "start-time is negative" in msg("talkvid-r-negative")
    assert "start-time is missing or not a finite number" in msg("talkvid-r-none-start")
    assert "start-time is missing or not a finite number" in msg("talkvid-r-string-start")
    assert "start-time is missing or not a finite number" in msg("talkvid-r-missing-start")
    assert "end-time is missing or not a finite number" in msg("talkvid-r-bool-end")
    assert "start-time=4.0 is not before end-time=4.0" in msg("talkvid-r-equal")
    assert "is not before" in msg("talkvid-r-inverted")
    assert "end-time" in msg("talkvid-r-nan") and "end-time" in msg("talkvid-r-inf")
    assert "info is missing" in msg("talkvid-r-no-info")
    assert "Video Link" in msg("talkvid-r-bad-link") and "YouTube" in msg("talkvid-r-bad-link")
    assert "11-character" in msg("talkvid-r-short-id")
    assert "id is missing" in msg("talkvid-#17") and "is a str, not an object" in msg("talkvid-#18")
    assert not any(".." in c.clip_id for c in m.clips)
    s = m.summary
    assert (s.records, s.clips, s.problems) == (len(records), 4, len(records) - 4)
    assert s.unique_source_ids == 3 and s.speakers == 2 and s.languages == 1
    assert s.duration_s == pytest.approx(5.0 + 5.0 + 5.0 + 5.0)


def test_start_and_end_fallback_keys_only_when_absent(tmp_path: Path):
    """``start``/``end`` (accepted by the official downloader) are read only when the
    hyphenated key is absent: a present ``start-time: 0.0`` is never replaced."""
    zero = _record("r-zero", start=0.0, end=4.0)
    zero["start"] = 2.0
    legacy = _record("r-legacy")
    del legacy["start-time"], legacy["end-time"]
    legacy.update(start=0.0, end=3.0, durations="3.0s")
    m = read_talkvid(_write(tmp_path, [zero, legacy]))
    got = {c.clip_id: (c.start_s, c.end_s) for c in m.clips}
    assert got == {"talkvid-r-zero": (0.0, 4.0), "talkvid-r-legacy": (0.0, 3.0)}


def test_frames_are_not_used_for_cutting(tmp_path: Path):
    record = _record("r-frames", start=2.0, end=7.0)
    record.update({"start-frame": 999, "end-frame": 3})
    (clip,) = read_talkvid(_write(tmp_path, [record])).clips
    assert (clip.start_s, clip.end_s) == (2.0, 7.0)


def test_soft_oddities_are_warnings(tmp_path: Path):
    records = [
        _record("r-five", durations="5.0s"),
        _record("r-unreadable", durations="abc"),
        _record("r-mismatch", durations="9.0s"),
        _record("r-number", durations=5.0),
        _record("r-missing-duration", durations=None),
        _record("r-scores", dover_scores="high", cotracker_ratio=None),
        _record("r-head", head_detail={"scores": {"avg_movement": 80, "min_movement": "n/a"}}),
        _record("r-no-scores", head_detail={"other": 1}),
        _record("r-dims", height=0, width=1919.5, fps="25"),
        _record("r-person", info={"Person ID": 42, "Video Link": "https://youtu.be/BBBBBBBBBBB"}),
    ]
    m = read_talkvid(_write(tmp_path, records))
    assert m.problems == []
    clips = {c.clip_id.removeprefix("talkvid-"): c for c in m.clips}
    ann = {k: c.talkvid for k, c in clips.items()}
    assert ann["r-five"].declared_duration_s == 5.0
    assert ann["r-unreadable"].declared_duration_s is None
    assert ann["r-mismatch"].declared_duration_s == 9.0  # kept, but flagged
    assert ann["r-number"].declared_duration_s == 5.0
    assert ann["r-missing-duration"].declared_duration_s is None
    assert ann["r-scores"].dover_score is None and ann["r-scores"].cotracker_ratio is None
    assert ann["r-head"].head_detail == {"avg_movement": 80.0}
    assert ann["r-no-scores"].head_detail == {}
    dims = clips["r-dims"]
    assert (dims.declared_height, dims.declared_width, dims.declared_fps) == (None, None, None)
    person = clips["r-person"]
    assert person.speaker == "42" and person.talkvid.person_id == "42"
    assert person.source_id == "BBBBBBBBBBB" and person.talkvid.gender == ""
    w = "\n".join(m.warnings)
    assert "talkvid-r-unreadable: durations 'abc' unreadable" in w
    assert "talkvid-r-mismatch: durations '9.0s' disagrees" in w
    assert "talkvid-r-scores: dover_scores 'high'" in w
    assert "head_detail.scores.min_movement 'n/a'" in w
    assert "talkvid-r-no-scores: head_detail has no 'scores'" in w
    assert all(f"talkvid-r-dims: {k}" in w for k in ("height 0", "width 1919.5", "fps '25'"))
    flagged = {line.split(":")[0] for line in m.warnings}
    assert flagged == {
        "talkvid-r-unreadable",
        "talkvid-r-mismatch",
        "talkvid-r-scores",
        "talkvid-r-head",
        "talkvid-r-no-scores",
        "talkvid-r-dims",
    }


def test_url_template_dataset_prefix_and_folder(tmp_path: Path):
    _write(tmp_path, [_record("r-one")], "filtered_video_clips_with_captions.json")
    (tmp_path / "notes.json").write_text("{}")  # ignored: a release file is present
    m = read_talkvid(
        tmp_path, url_template="file:///mirror/{id}.mp4", dataset="tv", licence="research"
    )
    (clip,) = m.clips
    assert clip.clip_id == "tv-r-one" and clip.dataset == "tv" and clip.licence == "research"
    assert clip.url == "file:///mirror/AAAAAAAAAAA.mp4"


def test_folder_with_both_release_files_is_ambiguous(tmp_path: Path):
    _write(tmp_path, [_record()], "filtered_video_clips.json")
    _write(tmp_path, [_record()], "filtered_video_clips_with_captions.json")
    with pytest.raises(ValueError, match="several TalkVid metadata files"):
        read_talkvid(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        read_talkvid(empty)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"id": "x"}', "expected an array"),
        ('{"clips": []}', "expected an array"),
        ('"text"', "expected an array"),
        ("[{not json", "invalid JSON"),
    ],
)
def test_non_array_top_level_is_a_config_error(tmp_path: Path, content: str, match: str):
    path = tmp_path / "filtered_video_clips.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_talkvid(path)
    assert "filtered_video_clips.json" in str(err.value)


def test_bad_bytes_and_wrong_types_fail_their_record_only(tmp_path: Path):
    records = [_record(), _record("videovideoBBBBBBBBBBB-s-s", description="MARK"), 7]
    path = tmp_path / "filtered_video_clips.json"
    path.write_bytes(json.dumps(records).encode().replace(b"MARK", b"caf\xc3("))
    m = read_talkvid(path)
    assert [c.clip_id for c in m.clips] == ["talkvid-videovideoAAAAAAAAAAA-scene1-scene1"]
    problems = {rid: f.message for rid, f in m.problems}
    assert problems == {
        "talkvid-videovideoBBBBBBBBBBB-s-s": (
            "filtered_video_clips.json[1]: record holds invalid UTF-8 in description: byte 0xc3"
        ),
        "talkvid-#2": "filtered_video_clips.json[2]: record is a int, not an object",
    }


def test_truncated_file_is_a_typed_row_and_other_datasets_go_on(tmp_path: Path):
    from tasks.download.datasets import DatasetSource, read_dataset

    path = tmp_path / "filtered_video_clips.json"
    path.write_text(json.dumps([_record(), _record("videovideoBBBBBBBBBBB-s-s")])[:-30])
    broken = read_dataset(DatasetSource(kind="talkvid", metadata=str(path)))
    ((rid, failure),) = broken.problems
    assert broken.records == [] and rid == "talkvid-#metadata"
    assert failure.kind == FailureKind.BAD_METADATA
    assert "filtered_video_clips.json" in failure.message and "line 1, column" in failure.message
    good = tmp_path / "ok" / "filtered_video_clips.json"
    good.parent.mkdir()
    good.write_text(json.dumps([_record()]))
    assert (
        len(read_dataset(DatasetSource(kind="talkvid", name="tv2", metadata=str(good))).records)
        == 1
    )
