"""The offline sample dataset: real HDTF format, real media, a detectable talking face."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import tasks.download.sample as sample_mod
from tasks.download.hdtf import read_hdtf
from tasks.download.sample import (
    COMPLETE_MARKER,
    SOURCES,
    build_sample_dataset,
    sample_metadata_dir,
    sample_videos_dir,
    write_sample_metadata,
)
from tasks.media import iter_frames
from tests.download_helpers import decode_audio, ffprobe_json, sample_root, stream


@pytest.fixture(scope="module")
def sample(request) -> Path:
    return sample_root(request)


def test_videos_have_the_declared_streams(sample: Path):
    for src in SOURCES:
        meta = ffprobe_json(sample_videos_dir(sample) / f"{src.youtube_id}.mp4")
        video, audio = stream(meta, "video"), stream(meta, "audio")
        assert video["codec_name"] == "h264" and (video["width"], video["height"]) == (480, 480)
        assert float(Fraction(video["avg_frame_rate"])) == src.fps
        assert int(video["nb_frames"]) == round(src.duration_s * src.fps)
        assert float(meta["format"]["duration"]) == pytest.approx(src.duration_s, abs=0.05)
        assert audio["codec_name"] == "aac"
        assert int(audio["sample_rate"]) == src.audio_rate_hz and audio["channels"] == 2
    assert {s.fps for s in SOURCES} == {25.0, 30.0}


def test_metadata_is_real_hdtf_format(sample: Path):
    meta = sample_metadata_dir(sample)
    url_bytes = (meta / "RD_video_url.txt").read_bytes()
    assert url_bytes.startswith(b"\xef\xbb\xbf") and not url_bytes.endswith(b"\n")
    assert b"&t=3s" in url_bytes
    assert any(
        line.endswith(" ") for line in (meta / "RD_annotion_time.txt").read_text().split("\n")
    )
    m = read_hdtf(meta, subsets=("RD",), url_template="file:///v/{id}.mp4", dataset="sample")
    assert m.problems == [] and m.warnings == []
    assert len(m.clips) == 6
    assert [c.declared_height for c in m.clips[::2]] == [720, 720, None]
    assert sum(c.crop is None for c in m.clips) == 1
    for c in m.clips:
        assert 4 <= c.duration_s <= 8
        assert c.url == f"file:///v/{c.source_id}.mp4"
        src = next(s for s in SOURCES if s.youtube_id == c.source_id)
        assert c.end_s <= src.duration_s


def test_speech_drives_the_mouth(sample: Path):
    """Dark mouth-interior pixels track the loudness of the track's own audio."""
    src = SOURCES[0]
    path = sample_videos_dir(sample) / f"{src.youtube_id}.mp4"
    dark = np.concatenate(
        [
            (chunk[:, 160:230, 195:285].max(axis=3) < 70).sum(axis=(1, 2))
            for chunk in iter_frames(path, 480, 480, chunk=64)
        ]
    ).astype(float)
    audio = decode_audio(path, 16000)
    per_frame = 16000 / src.fps
    rms = np.array(
        [
            np.sqrt(np.mean(audio[int(i * per_frame) : int((i + 1) * per_frame)] ** 2))
            for i in range(dark.size)
        ]
    )
    assert rms.max() > 0.05  # there is speech
    assert dark[:5].max() < 50  # mouth closed during the silent lead-in
    assert np.corrcoef(dark, rms)[0, 1] > 0.7


def test_mtcnn_finds_one_face_in_probed_frames(sample: Path):
    import torch
    from facenet_pytorch import MTCNN

    torch.manual_seed(0)
    detector = MTCNN(keep_all=True, device="cpu", min_face_size=60)
    for src in SOURCES:
        path = sample_videos_dir(sample) / f"{src.youtube_id}.mp4"
        frames = np.concatenate(list(iter_frames(path, 480, 480, chunk=64, fps=1.0)))[1::4]
        assert len(frames) == 3
        batch_boxes, batch_probs = detector.detect(list(frames))
        for boxes, probs in zip(batch_boxes, batch_probs, strict=True):
            assert boxes is not None and len(boxes) == 1, src.name
            x1, y1, x2, y2 = boxes[0]
            assert probs[0] > 0.9
            assert 80 < x2 - x1 < 200 and x1 >= 0 and x2 <= 480 and y1 >= 0 and y2 <= 480


def test_existing_dataset_is_returned_without_rebuilding(sample: Path):
    marker = sample / COMPLETE_MARKER
    before = {p: p.stat().st_mtime_ns for p in [marker, *sample_videos_dir(sample).iterdir()]}
    assert build_sample_dataset(sample, seed=0) == sample
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not list(sample.parent.glob(f".{sample.name}.tmp-*"))


def test_metadata_and_motion_are_deterministic(tmp_path: Path):
    write_sample_metadata(tmp_path / "a")
    write_sample_metadata(tmp_path / "b")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    m1 = sample_mod._motion(0, 1, 100, 30.0)
    assert np.array_equal(m1, sample_mod._motion(0, 1, 100, 30.0))
    assert not np.allclose(m1, sample_mod._motion(1, 1, 100, 30.0))
    assert np.abs(np.diff(m1[:, 0])).max() < 2.0  # smooth: < 2 px per frame


def test_a_crashed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while rendering")

    monkeypatch.setattr(sample_mod, "_mouth_corners", lambda image: (np.zeros(2), np.ones(2)))
    monkeypatch.setattr(sample_mod, "_render_source", crash)
    out = tmp_path / "sample"
    with pytest.raises(RuntimeError, match="simulated"):
        build_sample_dataset(out, seed=0)
    assert not out.exists()
    assert not list(tmp_path.glob(".sample.tmp-*"))
