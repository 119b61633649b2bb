"""The download stage end to end on the sample dataset through file:// URLs, and bad input."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tasks.base import FailureKind, ItemFailure, StageEnv
from tasks.download.sample import SOURCES, sample_videos_dir
from tasks.download.stage import DownloadConfig, DownloadStage, SampleConfig
from tasks.media import count_frames, iter_frames, read_wav
from tasks.records import NormalizedClip, SourceClip
from tests.download_helpers import (
    decode_audio,
    ffprobe_json,
    link_sample_into,
    make_stage,
    run_clip,
    sample_root,
    stream,
)


@pytest.fixture(scope="module")
def sample(request) -> Path:
    return sample_root(request)


@pytest.fixture(scope="module")
def processed(sample: Path, tmp_path_factory):
    """discover + process every sample clip once; shared by the checks below."""
    root = tmp_path_factory.mktemp("download-e2e")
    link_sample_into(root, sample)
    config = DownloadConfig(sample=SampleConfig(enabled=True))
    env = StageEnv(data_root=str(root), store_uri=str(root / "store"), run_id="t")
    clips, problems = DownloadStage.discover(DownloadStage.read_manifests(config, env))
    stage, store = make_stage(root, sample=SampleConfig(enabled=True))
    results = []
    for clip in clips:
        rec, ctx = run_clip(stage, store, clip)
        results.append((clip, rec, list(ctx.artifacts), store))
        ctx.close()
    return root, problems, results


def _path(store, ref) -> Path:
    return Path(store.local_path(ref.uri, cache_dir=Path("/nonexistent")))


def test_discover_reads_the_sample_as_hdtf(processed):
    _, problems, results = processed
    assert problems == []
    clips = [clip for clip, *_ in results]
    assert len(clips) == 6
    assert all(c.dataset == "sample" and c.url.startswith("file:///") for c in clips)
    assert {c.source_id for c in clips} == {s.youtube_id for s in SOURCES}


def test_clips_are_normalised(processed):
    _, _, results = processed
    for clip, rec, _, store in results:
        assert isinstance(rec, NormalizedClip)
        video = _path(store, rec.video)
        meta = ffprobe_json(video)
        v, a = stream(meta, "video"), stream(meta, "audio")
        assert float(Fraction(v["avg_frame_rate"])) == 25.0
        assert (int(a["sample_rate"]), a["channels"]) == (16000, 1)
        decoded = count_frames(video)
        assert abs(decoded - (clip.end_s - clip.start_s) * 25) <= 1
        assert rec.num_frames == decoded and rec.fps == 25.0
        samples, rate = read_wav(_path(store, rec.audio))
        assert rate == 16000 and rec.audio_channels == 1
        assert abs(samples.size / rate - rec.duration_s) <= 0.04
        assert (rec.width, rec.height) == (480, 480)  # apply_crop is off by default
        assert rec.start_s == clip.start_s and rec.end_s == clip.end_s
        assert rec.stats_rows()["clips"][0]["fps"] == 25.0


def test_raw_is_committed_once_per_source(processed):
    root, _, results = processed
    by_source: dict[str, set[str]] = {}
    for clip, rec, artifacts, store in results:
        assert [a.name for a in artifacts] == ["source.mp4", "clip.mp4", "audio.wav"]
        assert rec.raw is not None and rec.raw.kind == "raw_video"
        assert store.verify(rec.raw)
        by_source.setdefault(clip.source_id, set()).add(rec.raw.artifact_id)
    assert all(len(ids) == 1 for ids in by_source.values())
    assert len(list((root / "store").rglob("source.mp4"))) == 3
    assert len(list((root / "raw" / "sample").glob("*.mp4"))) == 3


def test_cut_is_frame_and_sample_accurate(processed, sample: Path):
    """Clip frame 0 is the source frame at start_s; the wav lines up with the source audio."""
    _, _, results = processed
    clip, rec, _, store = next(r for r in results if r[0].clip_id == "sample-RD-TfSample3_0")
    src = sample_videos_dir(sample) / f"{clip.source_id}.mp4"  # 25 fps source, start 2 s
    source_frames = np.concatenate(list(iter_frames(src, 480, 480, chunk=64)))
    first = next(iter_frames(_path(store, rec.video), 480, 480, chunk=1))[0].astype(float)
    errors = [np.mean((source_frames[i].astype(float) - first) ** 2) for i in range(46, 55)]
    assert int(np.argmin(errors)) + 46 == round(clip.start_s * 25)

    source_audio = decode_audio(src, 16000)
    clip_audio, _ = read_wav(_path(store, rec.audio))
    start = round(clip.start_s * 16000)
    lags = range(-800, 801, 16)
    scores = [
        float(np.dot(clip_audio[:16000], source_audio[start + lag : start + lag + 16000]))
        for lag in lags
    ]
    assert abs(lags[int(np.argmax(scores))]) <= 32  # within 2 ms


def test_apply_crop_scales_the_published_box(sample: Path, tmp_path: Path):
    link_sample_into(tmp_path, sample)
    config = DownloadConfig(sample=SampleConfig(enabled=True), apply_crop=True)
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")
    clips = {
        c.clip_id: c for c in DownloadStage.discover(DownloadStage.read_manifests(config, env))[0]
    }
    stage, store = make_stage(tmp_path, sample=SampleConfig(enabled=True), apply_crop=True)
    sizes = {}
    for cid in ("sample-RD-TfSample1_0", "sample-RD-TfSample2_1", "sample-RD-TfSample3_0"):
        rec, ctx = run_clip(stage, store, clips[cid])
        sizes[cid] = (rec.width, rec.height)
        ctx.close()
    assert sizes == {
        "sample-RD-TfSample1_0": (256, 256),  # 384 px box measured at 720p, frame is 480p
        "sample-RD-TfSample2_1": (480, 480),  # no crop box published: whole frame
        "sample-RD-TfSample3_0": (256, 256),  # unknown reference height: native pixels
    }


def _clip(url: str, source_id: str, **kw) -> SourceClip:
    fields = dict(
        dataset="sample",
        source_id=source_id,
        clip_id=f"sample-RD-{source_id}_0",
        url=url,
        start_s=1.0,
        end_s=3.0,
    )
    fields.update(kw)
    return SourceClip(**fields)


def _failure(tmp_path: Path, clip: SourceClip) -> ItemFailure:
    stage, store = make_stage(tmp_path)
    with pytest.raises(ItemFailure) as err:
        run_clip(stage, store, clip)
    assert "\n" not in err.value.message
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("clip.mp4"))
    return err.value


@pytest.fixture()
def source_mp4(sample: Path) -> Path:
    return sample_videos_dir(sample) / f"{SOURCES[2].youtube_id}.mp4"


def test_truncated_source_is_a_format_failure(tmp_path: Path, source_mp4: Path):
    data = source_mp4.read_bytes()
    bad = tmp_path / "trunc.mp4"
    bad.write_bytes(data[: len(data) // 2])  # moov atom at the end is lost
    failure = _failure(tmp_path, _clip(bad.as_uri(), "truncated01"))
    assert failure.kind == FailureKind.FORMAT and not failure.retryable


def test_truncated_faststart_source_fails_the_frame_count(tmp_path: Path, source_mp4: Path):
    """The index survives at the front, the data does not: caught by frames ≈ duration × fps."""
    fast = tmp_path / "fast.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(source_mp4), "-c", "copy", "-movflags", "+faststart",
         str(fast)],
        check=True,
    )  # fmt: skip
    data = fast.read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: int(len(data) * 0.4)])
    failure = _failure(tmp_path, _clip(bad.as_uri(), "truncated02", start_s=2.0, end_s=10.0))
    assert failure.kind == FailureKind.FORMAT
    assert "frames" in failure.message or "decode" in failure.message


def test_source_without_audio_is_a_format_failure(tmp_path: Path, source_mp4: Path):
    silent = tmp_path / "silent.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(source_mp4), "-an", "-c:v", "copy", str(silent)],
        check=True,
    )
    failure = _failure(tmp_path, _clip(silent.as_uri(), "noaudio0001"))
    assert failure.kind == FailureKind.FORMAT and "audio" in failure.message


def test_zero_byte_source_is_a_format_failure(tmp_path: Path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    failure = _failure(tmp_path, _clip(empty.as_uri(), "zerobyte001"))
    assert failure.kind == FailureKind.FORMAT


def test_missing_source_is_unavailable(tmp_path: Path):
    failure = _failure(tmp_path, _clip((tmp_path / "gone.mp4").as_uri(), "missing0001"))
    assert failure.kind == FailureKind.UNAVAILABLE and not failure.retryable


def test_ids_escaping_their_folder_are_bad_metadata(tmp_path: Path, source_mp4: Path):
    for clip in (
        _clip(source_mp4.as_uri(), "../escape", clip_id="sample-RD-ok_0"),
        _clip(source_mp4.as_uri(), "okid000001", clip_id="../../etc/x"),
        _clip(source_mp4.as_uri(), "okid000002", dataset="../up"),
    ):
        failure = _failure(tmp_path, clip)
        assert failure.kind == FailureKind.BAD_METADATA
    assert not (tmp_path.parent / "escape.mp4").exists()
    assert not list(tmp_path.rglob("*escape*"))


def test_clip_beyond_the_source_is_bad_metadata(tmp_path: Path, source_mp4: Path):
    failure = _failure(tmp_path, _clip(source_mp4.as_uri(), "beyond00001", start_s=10, end_s=30))
    assert failure.kind == FailureKind.BAD_METADATA and "source lasts" in failure.message


def test_config_contract():
    cfg = DownloadConfig()
    assert (cfg.fps, cfg.audio_sample_rate_hz, cfg.target_height, cfg.crf) == (25, 16000, 720, 17)
    assert not cfg.apply_crop and cfg.max_concurrent_downloads == 2 and cfg.datasets == []
    with pytest.raises(ValueError, match="outtmpl"):
        DownloadConfig(ytdlp_options={"outtmpl": "/tmp/x"})
    with pytest.raises(ValueError):
        DownloadConfig(unknown_field=1)
    # operational fields do not invalidate artifacts; output-changing ones do
    base = cfg.params_hash()
    assert DownloadConfig(max_concurrent_downloads=8, cookies_file="/c.txt").params_hash() == base
    assert DownloadConfig(sample=SampleConfig(enabled=True)).params_hash() == base
    assert DownloadConfig(fps=30).params_hash() != base
    assert DownloadConfig(apply_crop=True).params_hash() != base
    assert DownloadConfig(ytdlp_options={"format_sort": "res"}).params_hash() != base


def test_bad_metadata_in_every_dataset_fails_per_record_and_the_run_plans_the_rest(
    tmp_path: Path,
):
    """One run, three datasets: an HDTF line with a byte that is not UTF-8, a truncated
    CelebV-HQ file, a TalkVid record of the wrong type. Discovery raises nothing: each
    problem is a typed ``bad_metadata`` row naming file and position, and every good
    record of every dataset is planned."""
    import json

    from tasks.download.datasets import DatasetSource
    from tests.test_download_talkvid import _record

    hdtf = tmp_path / "hdtf"
    hdtf.mkdir()
    (hdtf / "RD_video_url.txt").write_bytes(
        b"Alpha https://www.youtube.com/watch?v=AAAAAAAAAAA\n"
        b"Bet\xe9 https://www.youtube.com/watch?v=BBBBBBBBBBB\n"
    )
    (hdtf / "RD_annotion_time.txt").write_bytes(b"Alpha.mp4 00:00-00:10\nBeta.mp4 00:00-00:10\n")
    celebvhq = tmp_path / "celebvhq_info.json"
    celebvhq.write_text('{"meta_info": {}, "clips": {"a": {"ytb_id": "CCCC')
    talkvid = tmp_path / "filtered_video_clips.json"
    talkvid.write_text(json.dumps([_record(), 7]))
    config = DownloadConfig(
        datasets=[
            DatasetSource(kind="hdtf", metadata=str(hdtf), subsets=["RD"]),
            DatasetSource(kind="celebvhq", metadata=str(celebvhq)),
            DatasetSource(kind="talkvid", metadata=str(talkvid)),
        ]
    )
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")
    clips, problems = DownloadStage.discover(DownloadStage.read_manifests(config, env))
    assert sorted(c.clip_id for c in clips) == [
        "hdtf-RD-Alpha_0", "talkvid-videovideoAAAAAAAAAAA-scene1-scene1"
    ]  # fmt: skip
    found = {rid: f for rid, f in problems}
    assert set(found) == {
        "hdtf-RD-RD_video_url.txt:2",  # the undecodable url line (its name is unreadable) ...
        "hdtf-RD-Beta",  # ... leaves Beta's annotation without a url
        "celebvhq-#metadata",
        "talkvid-#1",
    }
    assert {f.kind for f in found.values()} == {FailureKind.BAD_METADATA}
    assert found["hdtf-RD-RD_video_url.txt:2"].message.startswith(
        "RD_video_url.txt:2: invalid UTF-8 at column 4 (byte 0xe9)"
    )
    assert "celebvhq_info.json" in found["celebvhq-#metadata"].message
    assert "line 1, column" in found["celebvhq-#metadata"].message
    assert found["talkvid-#1"].message == (
        "filtered_video_clips.json[1]: record is a int, not an object"
    )
