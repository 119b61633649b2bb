"""CelebV-HQ metadata reader: the README schema example, every known trap, the official crop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from storage.store import safe_id
from tasks.base import FailureKind, ItemFailure
from tasks.download.celebvhq import (
    CELEBVHQ_LICENCE,
    celebv_crop_box,
    read_celebvhq,
)
from tasks.records import CropBox, EmotionSegment, NormalizedBox
from tests.download_helpers import SHARED

CELEBVHQ_EXAMPLE = (
    SHARED / "fixtures" / "metadata" / "celebvhq" / "SYNTHETIC_celebvhq_info_schema_example.json"
)
needs_shared = pytest.mark.skipif(
    not CELEBVHQ_EXAMPLE.is_file(), reason="../shared CelebV-HQ fixture not present"
)

APPEARANCE = ["Blurry", "Male", "Young", "Chubby"]  # capitalised as in the README
ACTIONS = ["blow", "talk", "smile"]


def _clip(ytb_id: str = "AAAAAAAAAAA", start: Any = 10.0, end: Any = 14.0, **over: Any) -> dict:
    clip = {
        "ytb_id": ytb_id,
        "duration": {"start_sec": start, "end_sec": end},
        "bbox": {"top": 0.1, "bottom": 0.9, "left": 0.2, "right": 0.7},
        "attributes": {
            "appearance": [0, 1, 0, 1],
            "action": [0, 1, 1],
            "emotion": {"sep_flag": False, "labels": "happy"},
        },
        "version": "v0.1",
    }
    clip.update(over)
    return clip


def _info(clips: dict[str, Any], meta_key: str = "meta_info") -> dict:
    meta = {"appearance_mapping": APPEARANCE, "action_mapping": ACTIONS}
    return {meta_key: meta, "clips": clips}


def _write(tmp_path: Path, info: Any, name: str = "celebvhq_info.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(info))
    return path


def _with(path: list[str], value: Any) -> dict:
    """A valid clip with one nested field replaced (``None`` value: the field removed)."""
    clip = copy.deepcopy(_clip())
    parent = clip
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return clip


@needs_shared
def test_readme_schema_example():
    m = read_celebvhq(CELEBVHQ_EXAMPLE)
    raw = json.loads(CELEBVHQ_EXAMPLE.read_text())
    appearance_names = raw["meta_info"]["appearance_mapping"]
    assert m.problems == [] and m.warnings == []
    clips = {c.clip_id: c for c in m.clips}
    assert list(clips) == ["celebvhq-M2Ohb0FAaJU_1", "celebvhq-_0tf2n3rlJU_0"]
    assert all(safe_id(i) == i for i in clips)

    first = clips["celebvhq-M2Ohb0FAaJU_1"]
    assert (first.source_id, first.start_s, first.end_s) == ("M2Ohb0FAaJU", 81.62, 86.17)
    assert first.url == "https://www.youtube.com/watch?v=M2Ohb0FAaJU"
    assert first.bbox == NormalizedBox(top=0.0, bottom=0.8815, left=0.1964, right=0.6922)
    assert first.speaker == "M2Ohb0FAaJU" and first.licence == CELEBVHQ_LICENCE
    ann = first.celebvhq
    # flag 1 at position 2 only: decoded with the file's own mapping
    assert ann.appearance == (appearance_names[2],) and ann.actions == ()
    assert (ann.emotion, ann.emotion_segments, ann.version) == ("neutral", (), "v0.1")

    # a YouTube id starting with '_': taken from ytb_id, the clip id starts with a letter
    second = clips["celebvhq-_0tf2n3rlJU_0"]
    assert second.source_id == "_0tf2n3rlJU" and second.duration_s == pytest.approx(3.38)
    assert second.celebvhq.emotion == "mixed"
    assert second.celebvhq.emotion_segments == (
        EmotionSegment(emotion="neutral", start_s=0.0, end_s=0.28),
        EmotionSegment(emotion="happy", start_s=1.28, end_s=3.28),
    )
    s = m.summary
    assert (s.clips_in_file, s.clips, s.unique_source_ids) == (2, 2, 2)
    assert (s.clips_with_segments, s.problems) == (1, 0)
    assert s.duration_s == pytest.approx(4.55 + 3.38)


@needs_shared
def test_readme_bboxes_cropped_on_a_720p_frame():
    """The official expand / denorm / to_square steps, worked by hand on 1280x720."""
    clips = read_celebvhq(CELEBVHQ_EXAMPLE).clips
    # bbox top 0, bottom .8815, left .1964, right .6922 -> expanded 0, .9015, .1764, .7122
    # denorm: top 0, bottom round(649.08)=649, left round(225.792)=226, right round(911.616)=912
    # h=649, w=686, c=324, centre (569, 324.5): x=569-324=245, y=floor(0.5)=0, side 648
    assert celebv_crop_box(clips[0].bbox, 1280, 720) == CropBox(
        x=245, y=0, w=648, h=648, reference_height=720
    )
    # bottom .8607 -> 620, left .5071 -> round(649.088)=649, right 1 -> 1280
    # h=620, w=631, c=310, centre (964.5, 310): x=floor(654.5)=654, y=0, side 620
    assert celebv_crop_box(clips[1].bbox, 1280, 720) == CropBox(
        x=654, y=0, w=620, h=620, reference_height=720
    )


def test_crop_box_rule_on_concrete_numbers():
    # 0.25..0.75 expanded to 0.23..0.77 on 1000x500: top 115 bottom 385 left 230 right 770
    # h=270, w=540: c=135, centre (500, 250) -> square 270 at (365, 115)
    box = celebv_crop_box(NormalizedBox(top=0.25, bottom=0.75, left=0.25, right=0.75), 1000, 500)
    assert box == CropBox(x=365, y=115, w=270, h=270, reference_height=500)
    # odd smaller side and half-pixel centre, on 101x101: expanded .08..0.35 x .08..0.92
    # top round(8.08)=8, bottom round(35.35)=35, left 8, right round(92.92)=93
    # h=27, w=85: c=13, side 26, centre (50.5, 21.5) -> x=floor(37.5)=37, y=floor(8.5)=8
    odd = celebv_crop_box(NormalizedBox(top=0.1, bottom=0.33, left=0.1, right=0.9), 101, 101)
    assert odd == CropBox(x=37, y=8, w=26, h=26, reference_height=101)
    # at the frame edge the expansion is clamped: 0..1 x .88..1 on 640x480
    # top 0, bottom 480, left round(563.2)=563, right 640: h=480, w=77, c=38, side 76,
    # centre (601.5, 240) -> x=floor(563.5)=563, y=202; the square ends at 639 <= 640
    edge = celebv_crop_box(NormalizedBox(top=0.0, bottom=1.0, left=0.9, right=1.0), 640, 480)
    assert edge == CropBox(x=563, y=202, w=76, h=76, reference_height=480)
    # expand=0 reproduces the plain denormalised square
    plain = celebv_crop_box(
        NormalizedBox(top=0.2, bottom=0.6, left=0.2, right=0.6), 100, 100, expand=0.0
    )
    assert plain == CropBox(x=20, y=20, w=40, h=40, reference_height=100)


def test_crop_box_too_small_is_bad_metadata():
    tiny = NormalizedBox(top=0.5, bottom=0.51, left=0.5, right=0.51)
    with pytest.raises(ItemFailure) as err:
        celebv_crop_box(tiny, 320, 240, expand=0.0)
    assert err.value.kind == FailureKind.BAD_METADATA and "16px" in err.value.message
    with pytest.raises(ValueError):
        celebv_crop_box(tiny, 0, 240)


def test_hand_made_traps(tmp_path: Path):
    clips = {
        "good_0": _clip(),
        "-dashStart1_0": _clip(ytb_id="-dashStart1"),
        "_underscore_3": _clip(ytb_id="_underscore"),
        "zero_start_0": _clip(start=0, end=2.5),
        "missing_start_0": _with(["duration", "start_sec"], None),
        "string_start_0": _clip(start="10.0"),
        "negative_end_0": _clip(start=5.0, end=-1.0),  # issue #11
        "equal_times_0": _clip(start=7.0, end=7.0),  # issue #11
        "inverted_0": _clip(start=9.0, end=3.0),
        "bool_start_0": _clip(start=True),
        "no_duration_0": _with(["duration"], None),
        "bad_ytb_0": _clip(ytb_id="short"),
        "no_ytb_0": _with(["ytb_id"], None),
        "bbox_range_0": _with(["bbox", "bottom"], 1.2),
        "bbox_negative_0": _with(["bbox", "left"], -0.1),
        "bbox_inverted_0": _with(["bbox", "top"], 0.95),
        "bbox_missing_side_0": _with(["bbox", "right"], None),
        "appearance_len_0": _with(["attributes", "appearance"], [0, 1, 0]),
        "action_len_0": _with(["attributes", "action"], [0, 1, 1, 0]),
        "action_value_0": _with(["attributes", "action"], [0, 2, 1]),
        "emotion_list_flag_false_0": _with(
            ["attributes", "emotion"], {"sep_flag": False, "labels": [{"emotion": "happy"}]}
        ),
        "emotion_no_flag_0": _with(["attributes", "emotion"], {"labels": "happy"}),
        "../../evil": _clip(),
        "version_number_0": _clip(version=1),
        "not_an_object_0": [1, 2],
    }
    m = read_celebvhq(_write(tmp_path, _info(clips)))
    got = {c.clip_id: c for c in m.clips}
    problems = {rid: f for rid, f in m.problems}
    assert all(f.kind == FailureKind.BAD_METADATA and not f.retryable for f in problems.values())
    assert set(got) == {
        "celebvhq-good_0",
        "celebvhq--dashStart1_0",
        "celebvhq-_underscore_3",
        "celebvhq-zero_start_0",
    }
    assert set(got) | set(problems) == {f"celebvhq-{k}" for k in clips}
    good = got["celebvhq-good_0"]
    # names decoded with the file's own (capitalised) mapping, in mapping order
    assert good.celebvhq.appearance == ("Male", "Chubby")
    assert good.celebvhq.actions == ("talk", "smile")
    assert good.celebvhq.emotion == "happy" and good.celebvhq.emotion_segments == ()
    assert got["celebvhq--dashStart1_0"].source_id == "-dashStart1"
    assert got["celebvhq-_underscore_3"].source_id == "_underscore"
    # a clip may start at 0.0 s; good_0 and zero_start_0 share one source video
    assert (got["celebvhq-zero_start_0"].start_s, got["celebvhq-zero_start_0"].end_s) == (0, 2.5)

    def msg(key: str) -> str:
        return problems[f"celebvhq-{key}"].message

    assert msg("missing_start_0").startswith("celebvhq_info.json: ")
    assert "duration.start_sec is missing" in msg("missing_start_0")
    assert "duration.start_sec is not a number" in msg("string_start_0")
    assert "duration.start_sec is not a number" in msg("bool_start_0")
    assert "duration.end_sec is negative" in msg("negative_end_0")
    assert "is not before duration.end_sec" in msg("equal_times_0")
    assert "is not before duration.end_sec" in msg("inverted_0")
    assert "duration is missing" in msg("no_duration_0")
    assert "ytb_id" in msg("bad_ytb_0") and "ytb_id" in msg("no_ytb_0")
    assert "bbox.bottom is outside [0, 1]" in msg("bbox_range_0")
    assert "bbox.left is outside [0, 1]" in msg("bbox_negative_0")
    assert "bbox is empty or inverted" in msg("bbox_inverted_0")
    assert "bbox.right is missing" in msg("bbox_missing_side_0")
    assert "attributes.appearance has 3 flags but its mapping has 4" in msg("appearance_len_0")
    assert "attributes.action has 4 flags but its mapping has 3" in msg("action_len_0")
    assert "other than 0 and 1" in msg("action_value_0")
    assert "attributes.emotion.labels" in msg("emotion_list_flag_false_0")
    assert "sep_flag" in msg("emotion_no_flag_0")
    assert "unsafe id" in msg("../../evil")
    assert "version" in msg("version_number_0")
    assert "expected an object" in msg("not_an_object_0")
    assert not any(".." in c.clip_id for c in m.clips)
    s = m.summary
    assert (s.clips_in_file, s.clips, s.problems) == (len(clips), 4, len(clips) - 4)
    assert s.unique_source_ids == 3 and s.duration_s == pytest.approx(4.0 * 3 + 2.5)


def test_nan_and_infinity_times_are_rejected(tmp_path: Path):
    clips = {"nan_0": _clip(start=float("nan")), "inf_0": _clip(end=float("inf"))}
    path = _write(tmp_path, _info(clips))
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()  # as Python writes them
    m = read_celebvhq(path)
    assert m.clips == []
    problems = dict(m.problems)
    assert "duration.start_sec is not finite" in problems["celebvhq-nan_0"].message
    assert "duration.end_sec is not finite" in problems["celebvhq-inf_0"].message


def test_emotion_segments_are_relative_to_the_clip_start(tmp_path: Path):
    def segmented(*segments: tuple[str, Any, Any]) -> dict:
        labels = [{"emotion": e, "start_sec": s, "end_sec": t} for e, s, t in segments]
        emotion = {"sep_flag": True, "labels": labels}
        return _with(["attributes", "emotion"], emotion)  # clip 10.0 .. 14.0 s, 4 s long

    clips = {
        "ok_0": segmented(("neutral", 0, 1.5), ("happy", 2.0, 4.0)),
        "tolerated_0": segmented(("sad", 3.0, 4.05)),  # rounding past the end: kept
        "absolute_times_0": segmented(("happy", 10.5, 12.0)),  # source times, not relative
        "negative_0": segmented(("happy", -0.5, 1.0)),
        "inverted_0": segmented(("happy", 2.0, 2.0)),
        "no_label_0": segmented(("", 0.0, 1.0)),
        "empty_0": _with(["attributes", "emotion"], {"sep_flag": True, "labels": []}),
    }
    m = read_celebvhq(_write(tmp_path, _info(clips)))
    got = {c.clip_id: c for c in m.clips}
    problems = {rid: f.message for rid, f in m.problems}
    ok = got["celebvhq-ok_0"]
    assert ok.start_s == 10.0 and ok.celebvhq.emotion == "mixed"
    assert [(e.emotion, e.start_s, e.end_s) for e in ok.celebvhq.emotion_segments] == [
        ("neutral", 0.0, 1.5),
        ("happy", 2.0, 4.0),
    ]
    assert got["celebvhq-tolerated_0"].celebvhq.emotion_segments[0].end_s == 4.05
    assert "labels[0].end_sec=12.0 is past the clip end" in problems["celebvhq-absolute_times_0"]
    assert "labels[0].start_sec is negative" in problems["celebvhq-negative_0"]
    assert "is not before" in problems["celebvhq-inverted_0"]
    assert "labels[0].emotion" in problems["celebvhq-no_label_0"]
    assert "list of segments" in problems["celebvhq-empty_0"]
    assert m.summary.clips_with_segments == 2


def test_mete_info_typo_folder_path_url_template_and_prefix(tmp_path: Path):
    _write(tmp_path, _info({"AAAAAAAAAAA_2": _clip()}, meta_key="mete_info"))
    m = read_celebvhq(tmp_path, url_template="file:///mirror/{id}.mp4", dataset="cv", licence="x")
    (clip,) = m.clips
    assert clip.clip_id == "cv-AAAAAAAAAAA_2" and clip.dataset == "cv" and clip.licence == "x"
    assert clip.url == "file:///mirror/AAAAAAAAAAA.mp4"
    assert clip.celebvhq.appearance == ("Male", "Chubby")
    # both spellings: meta_info wins, with a warning
    info = _info({"k_0": _clip()})
    info["mete_info"] = {"appearance_mapping": ["x"] * 4, "action_mapping": ["y"] * 3}
    both = read_celebvhq(_write(tmp_path, info, "both.json"))
    assert both.clips[0].celebvhq.appearance == ("Male", "Chubby")
    assert any("mete_info" in w for w in both.warnings)


def test_duplicate_keys_are_reported_not_silently_merged(tmp_path: Path):
    first, second = json.dumps(_clip(start=1.0, end=2.0)), json.dumps(_clip(start=5.0, end=9.0))
    meta = json.dumps({"appearance_mapping": APPEARANCE, "action_mapping": ACTIONS})
    nested = json.dumps(_clip()).replace('"version"', '"bbox": {"top": 0}, "version"')
    text = (
        f'{{"meta_info": {meta}, "clips": {{"dup_0": {first}, "other_0": {nested}, '
        f'"dup_0": {second}}}}}'
    )
    path = tmp_path / "celebvhq_info.json"
    path.write_text(text)
    m = read_celebvhq(path)
    (clip,) = m.clips
    # the first occurrence wins (json.load would have kept the last, 5..9 s)
    assert clip.clip_id == "celebvhq-dup_0" and (clip.start_s, clip.end_s) == (1.0, 2.0)
    problems = {rid: f for rid, f in m.problems}
    # the repeat is keyed by its position, so it never shadows the kept clip's id
    assert "appears again" in problems["celebvhq-dup_0#dup2"].message
    assert "bbox appears twice" in problems["celebvhq-other_0"].message
    assert m.summary.clips_in_file == 3 and m.summary.problems == 2


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "top level is a list"),
        ('{"meta_info": {}}', "no 'clips'"),
        ('{"clips": {}}', "meta_info"),
        ('{"meta_info": {"appearance_mapping": [], "action_mapping": "x"}, "clips": {}}', "action"),
        ('{"clips": {}, "clips": {}, "meta_info": {}}', "appears twice"),
    ],
)
def test_malformed_file_is_a_config_error(tmp_path: Path, content: str, match: str):
    path = tmp_path / "celebvhq_info.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_celebvhq(path)
    assert "celebvhq_info.json" in str(err.value)


def test_missing_file_in_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_celebvhq(tmp_path)


def test_an_invalid_utf8_byte_fails_its_clip_only(tmp_path: Path):
    info = _info({"good": _clip(), "bad": _clip("BBBBBBBBBBB", version="vMARK")})
    path = tmp_path / "celebvhq_info.json"
    path.write_bytes(
        json.dumps(info).replace("vMARK", "v\\u00e9").encode().replace(b"\\u00e9", b"\xe9")
    )
    m = read_celebvhq(path)
    assert [c.clip_id for c in m.clips] == ["celebvhq-good"]
    ((rid, failure),) = m.problems
    assert rid == "celebvhq-bad" and failure.kind == FailureKind.BAD_METADATA
    assert failure.message == (
        "celebvhq_info.json: clip holds invalid UTF-8 in bad.version: byte 0xe9"
    )


def test_truncated_info_file_is_a_typed_row_with_its_position(tmp_path: Path):
    from tasks.download.datasets import DatasetSource, read_dataset

    path = tmp_path / "celebvhq_info.json"
    path.write_text(json.dumps(_info({"a": _clip()}))[:-20])
    manifest = read_dataset(DatasetSource(kind="celebvhq", metadata=str(path)))
    assert manifest.records == []
    ((rid, failure),) = manifest.problems
    assert rid == "celebvhq-#metadata" and failure.kind == FailureKind.BAD_METADATA
    assert "celebvhq_info.json" in failure.message and "line 1, column" in failure.message
