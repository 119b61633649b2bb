"""HDTF metadata reader: the published counts on the real files, and every known trap."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.store import safe_id
from tasks.base import FailureKind, ItemFailure
from tasks.download.hdtf import (
    parse_range_s,
    parse_time_s,
    read_hdtf,
    scale_crop,
    youtube_id_from_url,
)
from tasks.records import CropBox
from tests.download_helpers import HDTF_METADATA

needs_shared = pytest.mark.skipif(
    not HDTF_METADATA.is_dir(), reason="../shared HDTF metadata fixtures not present"
)

NO_CROP_CLIPS = {
    "RD-Radio6_0", "RD-Radio15_0", "WDA-ByronDorgan0_0", "WDA-DeanPhillips_0",
    "WDA-JeffMerkley0_0", "WDA-JimMcGovern1_0", "WDA-JimMcGovern_0", "WDA-LindaSnchez_0",
    "WRA-BillCassidy_0", "WRA-CandiceMiller_0", "WRA-DuncanHunter_1",
    "WRA-JaimeHerreraBeutler_0", "WRA-KevinBrady0_0", "WRA-MittRomney_1", "WRA-RudyGiuliani_0",
}  # fmt: skip


@needs_shared
def test_real_hdtf_published_counts():
    m = read_hdtf(HDTF_METADATA)
    s = m.summary
    assert s is not None
    assert s.url_entries == 370
    assert s.unique_source_ids == 369
    assert s.annotated_videos == 369
    assert s.segments == 436
    assert s.segments_duration_s / 3600 == pytest.approx(17.07, abs=0.005)
    assert s.clips == len(m.clips) == 436
    assert s.clips_with_crop == 421
    # the only row that cannot become a clip: Radio24 has a URL but no annotation
    assert [(rid, f.kind) for rid, f in m.problems] == [
        ("hdtf-RD-Radio24", FailureKind.BAD_METADATA)
    ]
    assert m.warnings == []
    ids = [c.clip_id for c in m.clips]
    assert len(set(ids)) == len(ids)
    assert all(safe_id(i) == i for i in ids)
    no_crop = {c.clip_id.removeprefix("hdtf-") for c in m.clips if c.crop is None}
    assert no_crop == NO_CROP_CLIPS


@needs_shared
def test_real_hdtf_traps():
    clips = {c.clip_id: c for c in read_hdtf(HDTF_METADATA).clips}
    # UTF-8 BOM before the first WDA name: the clip is not lost
    carolyn = clips["hdtf-WDA-CarolynMaloney2_0"]
    assert carolyn.source_id == "RApGxN-O9Qc"
    # &t=9s dropped from the normalised URL
    assert clips["hdtf-WDA-DanKildee_0"].url == "https://www.youtube.com/watch?v=FQZCs0pSjNg"
    assert all("&" not in c.url and c.url.endswith(c.source_id) for c in clips.values())
    # unsorted, overlapping ranges are kept in their published order
    r0, r1 = clips["hdtf-WRA-MittRomney_0"], clips["hdtf-WRA-MittRomney_1"]
    assert (r0.start_s, r0.end_s, r1.start_s, r1.end_s) == (490, 510, 33, 533)
    assert r0.crop is not None and r1.crop is None
    # trailing space on the line: exactly three clips, no empty token
    assert [k for k in clips if k.startswith("hdtf-WRA-AdamKinzinger2_")] == [
        f"hdtf-WRA-AdamKinzinger2_{i}" for i in range(3)
    ]
    # two names, one YouTube video
    assert clips["hdtf-WDA-WhipJimClyburn_0"].source_id == "gh3YqnvNdio"
    assert clips["hdtf-WDA-JamesClyburn1_0"].source_id == "gh3YqnvNdio"
    # declared height 0 (not a real height) is unknown, and so is the crop's reference
    kevin = clips["hdtf-WRA-KevinMcCarthy1_0"]
    assert kevin.declared_height is None and kevin.crop.reference_height is None
    # ten clips on one line, indices follow the line order
    radio34 = [c for k, c in clips.items() if k.startswith("hdtf-RD-Radio34_")]
    assert len(radio34) == 10 and radio34[-1].clip_id == "hdtf-RD-Radio34_9"
    # crop columns are x w y h
    assert clips["hdtf-RD-Radio10_0"].crop == CropBox(
        x=483, y=0, w=390, h=390, reference_height=720
    )


@needs_shared
def test_real_box_taller_than_its_declared_height_is_rejected():
    """MazieHirono1_0 (h=1134, declared 720p) was measured on a 1080p download."""
    mazie = next(
        c
        for c in read_hdtf(HDTF_METADATA, subsets=("WDA",)).clips
        if c.clip_id.endswith("MazieHirono1_0")
    )
    assert mazie.crop is not None and mazie.crop.reference_height == 720
    with pytest.raises(ItemFailure) as err:
        scale_crop(mazie.crop, 1280, 720)
    assert err.value.kind == FailureKind.BAD_METADATA and "outside" in err.value.message
    # taken as measured on a 1080p frame it sticks out by 54 px: clamped into the frame
    box = scale_crop(mazie.crop.model_copy(update={"reference_height": None}), 1920, 1080)
    assert (box.x, box.y, box.w, box.h) == (83, 0, 1134, 1080)


def _write(path: Path, text: str, *, bom: bool = False, final_newline: bool = True) -> None:
    data = text if not final_newline else text + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode())


def test_hand_made_traps(tmp_path: Path):
    _write(
        tmp_path / "RD_video_url.txt",
        "\n".join(
            [
                "Alpha https://www.youtube.com/watch?v=AAAAAAAAAAA",
                "Beta https://www.youtube.com/watch?v=BBBBBBBBBBB&t=3s",
                "Gamma https://youtu.be/CCCCCCCCCCC",
                "NoAnn https://www.youtube.com/watch?v=DDDDDDDDDDD",
                "Alpha https://www.youtube.com/watch?v=ZZZZZZZZZZZ",  # duplicate name
                "../x https://www.youtube.com/watch?v=EEEEEEEEEEE",
                "BadUrl https://example.com/video.mp4",
                "Long https://www.youtube.com/watch?v=-leadingDsh",
                "Empty https://www.youtube.com/watch?v=FFFFFFFFFFF",
                "",
            ]
        ),
        bom=True,
        final_newline=False,
    )
    _write(
        tmp_path / "RD_annotion_time.txt",
        "\n".join(
            [
                "Alpha.mp4 00:10-00:20 01:00-00:50 00:2x-00:30 00:40-00:45 ",  # trailing space
                "Beta.mp4 1:02:03-1:02:13",
                "Gamma.mp4 00:30-00:40",
                "../x.mp4 00:00-00:10",
                "BadUrl.mp4 00:00-00:10",
                "Orphan.mp4 00:00-00:10",
                "Long.mp4 00:00-00:10 00:05-00:15",
                "Empty.mp4",
            ]
        ),
        final_newline=False,
    )
    _write(tmp_path / "RD_resolution.txt", "Alpha.mp4 1080\r\nBeta.mp4 714\r\nGamma.mp4 zero")
    _write(
        tmp_path / "RD_crop_wh.txt",
        "Alpha_0.mp4 10 500 20 500\nAlpha_3.mp4 1 2 3\n"
        "Beta_0.mp4 5 100 6 100\nAlpha_9.mp4 1 64 1 64",
    )
    m = read_hdtf(tmp_path, subsets=("RD",))
    clips = {c.clip_id: c for c in m.clips}
    problems = {rid: f for rid, f in m.problems}
    assert all(f.kind == FailureKind.BAD_METADATA and not f.retryable for f in problems.values())

    # BOM stripped: Alpha is found; duplicate name reported, first URL kept
    assert clips["hdtf-RD-Alpha_0"].source_id == "AAAAAAAAAAA"
    assert "duplicate" in problems["hdtf-RD-Alpha"].message
    # clip indices keep their positions even when a range in between is malformed
    assert set(k for k in clips if "Alpha" in k) == {"hdtf-RD-Alpha_0", "hdtf-RD-Alpha_3"}
    assert "end is not after start" in problems["hdtf-RD-Alpha_1"].message
    assert "bad time" in problems["hdtf-RD-Alpha_2"].message
    assert clips["hdtf-RD-Alpha_0"].crop == CropBox(x=10, y=20, w=500, h=500, reference_height=1080)
    assert clips["hdtf-RD-Alpha_3"].crop is None  # malformed crop line: kept, no crop
    assert clips["hdtf-RD-Alpha_0"].declared_height == 1080
    # &t= and H:MM:SS; non-standard height 714 is unknown
    beta = clips["hdtf-RD-Beta_0"]
    assert beta.url == "https://www.youtube.com/watch?v=BBBBBBBBBBB"
    assert (beta.start_s, beta.end_s) == (3723, 3733)
    assert beta.declared_height is None and beta.crop.reference_height is None
    assert clips["hdtf-RD-Gamma_0"].source_id == "CCCCCCCCCCC"
    assert clips["hdtf-RD-Gamma_0"].declared_height is None
    # ids starting with '-' are valid YouTube ids; overlapping ranges are both kept
    assert {clips["hdtf-RD-Long_0"].source_id, clips["hdtf-RD-Long_1"].source_id} == {"-leadingDsh"}
    # URL without annotation, annotation without URL, bad URL, empty line, escaping name
    assert "no annotation" in problems["hdtf-RD-NoAnn"].message
    assert "no URL" in problems["hdtf-RD-Orphan"].message
    assert "YouTube" in problems["hdtf-RD-BadUrl"].message
    assert "no time ranges" in problems["hdtf-RD-Empty"].message
    assert "unsafe id" in problems["hdtf-RD-../x_0"].message
    assert not any(".." in k for k in clips)
    assert m.summary.url_entries == 9 and m.summary.annotated_videos == 8
    assert m.summary.unique_source_ids == 7  # BadUrl has none; the duplicate Alpha is skipped
    assert any("malformed crop" in w for w in m.warnings)
    assert any("Alpha_9" in w for w in m.warnings)  # crop for a clip that does not exist


def test_url_template_and_dataset_prefix(tmp_path: Path):
    _write(tmp_path / "WRA_video_url.txt", "Zed https://www.youtube.com/watch?v=_o9fzcCk5C8&t=1s")
    _write(tmp_path / "WRA_annotion_time.txt", "Zed.mp4 00:01-00:03")
    m = read_hdtf(
        tmp_path, subsets=("WRA",), url_template="file:///mirror/{id}.mp4", dataset="mirror"
    )
    (clip,) = m.clips
    assert clip.clip_id == "mirror-WRA-Zed_0" and clip.dataset == "mirror"
    assert clip.url == "file:///mirror/_o9fzcCk5C8.mp4"
    assert any("resolution.txt missing" in w for w in m.warnings)


def test_missing_required_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_hdtf(tmp_path, subsets=("RD",))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:20", 20), ("01:35", 95), ("15:00", 900), ("1:02:03", 3723), ("00:01.5", 1.5)],
)
def test_parse_time(text: str, seconds: float):
    assert parse_time_s(text) == seconds


@pytest.mark.parametrize("text", ["", "20", "00:60", "1:60:00", "aa:bb", "-1:00", "1:2:3:4"])
def test_parse_time_rejects(text: str):
    with pytest.raises(ValueError):
        parse_time_s(text)


def test_parse_range():
    assert parse_range_s("08:10-08:30") == (490, 510)
    for bad in ("00:30-00:30", "00:30-00:10", "00:10", "00:10-00:20-00:30"):
        with pytest.raises(ValueError):
            parse_range_s(bad)


def test_youtube_id_from_url():
    assert youtube_id_from_url("https://www.youtube.com/watch?v=uBWJJvynXpA&t=6s") == "uBWJJvynXpA"
    assert youtube_id_from_url("https://www.youtube.com/watch?t=6&v=uBWJJvynXpA") == "uBWJJvynXpA"
    assert youtube_id_from_url("https://youtu.be/uBWJJvynXpA?t=3") == "uBWJJvynXpA"
    for bad in (
        "https://www.youtube.com/watch?v=short",
        "https://www.youtube.com/watch?v=../../etc/pw",
        "ftp://www.youtube.com/watch?v=uBWJJvynXpA",
        "https://evil.example/watch?v=uBWJJvynXpA",
    ):
        with pytest.raises(ValueError):
            youtube_id_from_url(bad)


def test_scale_crop():
    box = CropBox(x=168, y=48, w=384, h=384, reference_height=720)
    assert scale_crop(box, 480, 480) == CropBox(x=112, y=32, w=256, h=256, reference_height=480)
    # measured at 1080p, downloaded at 720p
    big = CropBox(x=510, y=0, w=864, h=864, reference_height=1080)
    assert scale_crop(big, 1280, 720) == CropBox(x=340, y=0, w=576, h=576, reference_height=720)
    # unknown reference: taken as measured on this frame
    assert scale_crop(box.model_copy(update={"reference_height": None}), 640, 480).w == 384
    # slightly outside: shifted in, size kept
    edge = scale_crop(CropBox(x=-10, y=465, w=100, h=101), 640, 560)
    assert (edge.x, edge.y, edge.w, edge.h) == (0, 460, 100, 100)
    # far outside: rejected with a reason
    with pytest.raises(ItemFailure) as err:
        scale_crop(CropBox(x=600, y=0, w=300, h=300), 640, 480)
    assert err.value.kind == FailureKind.BAD_METADATA and "outside" in err.value.message


def test_an_undecodable_line_is_a_typed_problem_and_the_other_lines_go_on(tmp_path: Path):
    (tmp_path / "RD_video_url.txt").write_bytes(
        b"Alpha https://www.youtube.com/watch?v=AAAAAAAAAAA\n"
        b"Beta https://www.youtube.com/watch?v=BBBBBBBBBBB&caf\xe9=1\n"
        b"Gamma https://www.youtube.com/watch?v=CCCCCCCCCCC\n"
        b"D\xff https://www.youtube.com/watch?v=DDDDDDDDDDD\n"
    )
    (tmp_path / "RD_annotion_time.txt").write_bytes(
        b"Alpha.mp4 00:00-00:10\nBeta.mp4 00:00-00:10\nGamma.mp4 00:00\xc3-00:10\n"
    )
    (tmp_path / "RD_crop_wh.txt").write_bytes(b"Alpha_0.mp4 1 64 1 64 \x80\n")
    m = read_hdtf(tmp_path, subsets=("RD",))
    assert [c.clip_id for c in m.clips] == ["hdtf-RD-Alpha_0"]
    problems = {rid: f for rid, f in m.problems}
    assert set(problems) == {"hdtf-RD-Beta", "hdtf-RD-Gamma", "hdtf-RD-RD_video_url.txt:4"}
    assert all(f.kind == FailureKind.BAD_METADATA for f in problems.values())
    assert problems["hdtf-RD-Beta"].message == (
        "RD_video_url.txt:2: invalid UTF-8 at column 53 (byte 0xe9); line skipped"
    )
    assert problems["hdtf-RD-Gamma"].message.startswith("RD_annotion_time.txt:3: invalid UTF-8")
    assert "column 2" in problems["hdtf-RD-RD_video_url.txt:4"].message
    assert any(w.startswith("RD_crop_wh.txt:1: invalid UTF-8") for w in m.warnings)
    assert m.clips[0].crop is None  # its crop line was unreadable
