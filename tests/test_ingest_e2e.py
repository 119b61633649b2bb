"""End to end over loopback HTTP: HDTF-, CelebV-HQ- and TalkVid-format manifests.

The real CLI runs the download stage (Prefect flow, Ray workers) against a loopback server
that serves real videos and misbehaves for some sources. Every good clip is checked with
ffprobe (25 fps, 16 kHz mono, duration = the annotated range); every bad source or row is
a typed failure and the run completes. ``ingest`` / ``datasets`` / ``sql`` answer questions
about the manifests before anything is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.catalog import Catalog
from talkforge.cli import app
from tests.download_helpers import SHARED, ffprobe_json, stream
from tests.loopback_server import Route, serve

FIXTURES = SHARED / "fixtures" / "metadata"


def _media(sample_dir: Path) -> list[bytes]:
    shared = sorted((SHARED / "fixtures" / "clips").glob("face_*.mp4"))
    paths = shared[:3] if len(shared) >= 3 else sorted((sample_dir / "videos").glob("*.mp4"))
    return [p.read_bytes() for p in paths]


def _hdtf(meta: Path) -> None:
    meta.mkdir(parents=True)
    (meta / "RD_video_url.txt").write_text(
        "Alpha1 https://www.youtube.com/watch?v=hdtfAlpha01&t=5s\n"
        "Beta2 https://www.youtube.com/watch?v=hdtfGone002"  # no final newline, like WDA
    )
    (meta / "RD_resolution.txt").write_text("Alpha1.mp4 720\nBeta2.mp4 1080\n")
    (meta / "RD_annotion_time.txt").write_text(
        "Alpha1.mp4 00:02-00:04 00:00-00:02 \nBeta2.mp4 00:01-00:03\n"
    )
    (meta / "RD_crop_wh.txt").write_text("")
    (meta / "RD_crop_ratio.txt").write_text("")


def _celebvhq(path: Path) -> None:
    def clip(ytb_id: str, start: float, end: float) -> dict:
        return {
            "ytb_id": ytb_id,
            "duration": {"start_sec": start, "end_sec": end},
            "bbox": {"top": 0.05, "bottom": 0.85, "left": 0.2, "right": 0.8},
            "attributes": {
                "appearance": [0, 1],
                "action": [1, 0, 1],
                "emotion": {"sep_flag": False, "labels": "happy"},
            },
            "version": "v0.1",
        }

    info = {
        "meta_info": {
            "appearance_mapping": ["blurry", "male"],
            "action_mapping": ["talk", "smile", "nod"],
        },
        "clips": {
            "-celebOk001_0": clip("-celebOk001", 0.5, 2.5),
            "-celebOk001_1": clip("-celebOk001", 2.5, 4.0),
            "celebBusy01_0": clip("celebBusy01", 1.0, 3.0),
            "celebBad001_0": clip("celebBad001", 3.0, 3.0),
        },
    }
    path.write_text(json.dumps(info))


def _talkvid(path: Path) -> None:
    def record(rid: str, vid: str, start: float, end: float, language: str) -> dict:
        return {
            "id": rid,
            "height": 1080,
            "width": 1920,
            "fps": 25.0,
            "start-time": start,
            "end-time": end,
            "durations": f"{end - start:.3f}s",
            "info": {
                "Person ID": "7",
                "Gender": "Female",
                "Age Group": "31-45",
                "Ethnicity": "Asian",
                "Language": language,
                "Video Category": "Education",
                "Video Link": f"https://www.youtube.com/watch?v={vid}",
            },
            "dover_scores": 8.1,
            "cotracker_ratio": 0.93,
            "head_detail": {"scores": {"avg_movement": 95.0, "min_movement": 80.0}},
        }

    path.write_text(
        json.dumps(
            [
                record("videovideo-talkOk0001-scene1-scene1", "-talkOk0001", 0.0, 3.0, "Thai"),
                record("videovideotalkJunk01-scene2_scene1", "talkJunk001", 0.5, 2.0, "Polish"),
            ]
        )
    )


def _config(tmp_path: Path, base_url: str) -> Path:
    meta = tmp_path / "meta"
    _hdtf(meta / "hdtf")
    _celebvhq(meta / "celebvhq_info.json")
    _talkvid(meta / "talkvid.json")
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "download:\n"
        "  sample: {enabled: false}\n"
        "  apply_crop: true\n"
        "  download_attempts: 3\n"
        "  retry_base_delay_s: 0.1\n"
        "  socket_timeout_s: 5\n"
        "  datasets:\n"
        f"    - {{kind: hdtf, metadata: {meta / 'hdtf'}, subsets: [RD],\n"
        f"       url_template: '{base_url}/hdtf/{{id}}.mp4'}}\n"
        f"    - {{kind: celebvhq, metadata: {meta / 'celebvhq_info.json'},\n"
        f"       url_template: '{base_url}/celebvhq/{{id}}.mp4'}}\n"
        f"    - {{kind: talkvid, metadata: {meta / 'talkvid.json'},\n"
        f"       url_template: '{base_url}/talkvid/{{id}}.mp4'}}\n"
    )
    return cfg


def test_three_formats_download_and_normalize_over_loopback(
    tmp_path: Path, sample_dir: Path, ray_session: None
):
    a, b, c = _media(sample_dir)
    with serve() as server:
        routes = {
            "hdtf/hdtfAlpha01.mp4": Route(a),
            "hdtf/hdtfGone002.mp4": Route(a, "status", 404),
            "celebvhq/-celebOk001.mp4": Route(b),
            "celebvhq/celebBusy01.mp4": Route(b, "status", 429, retry_after="1", times=1),
            "talkvid/-talkOk0001.mp4": Route(c),
            "talkvid/talkJunk001.mp4": Route(c, "garbage"),
        }
        for path, route in routes.items():
            server.add(path, route)
        cfg = _config(tmp_path, server.base_url)
        runner = CliRunner()
        ingest = runner.invoke(app, ["ingest", "--config", str(cfg), "--format", "json"])
        assert ingest.exit_code == 0, ingest.output
        assert not any(r.hits for r in routes.values()), "ingest must not download"
        result = runner.invoke(
            app, ["run", "--config", str(cfg), "--stages", "download"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output

    catalog = Catalog(tmp_path / "data" / "catalog")
    items = {
        r["item_id"]: r
        for r in catalog.query(
            "SELECT item_id, status, error_kind, retryable, record_json FROM current_items "
            "WHERE stage = 'download'"
        ).to_pylist()
    }
    failed = {
        k: (v["error_kind"], v["retryable"]) for k, v in items.items() if v["status"] != "done"
    }
    assert failed == {
        "hdtf-RD-Beta2_0": ("unavailable", False),
        "celebvhq-celebBad001_0": ("bad_metadata", False),
        "talkvid-videovideotalkJunk01-scene2_scene1": ("format", False),
    }
    done = {k: json.loads(v["record_json"]) for k, v in items.items() if v["status"] == "done"}
    expected_s = {
        "hdtf-RD-Alpha1_0": 2.0,
        "hdtf-RD-Alpha1_1": 2.0,
        "celebvhq--celebOk001_0": 2.0,
        "celebvhq--celebOk001_1": 1.5,
        "celebvhq-celebBusy01_0": 2.0,
        "talkvid-videovideo-talkOk0001-scene1-scene1": 3.0,
    }
    assert set(done) == set(expected_s)
    for clip_id, record in done.items():
        meta = ffprobe_json(Path(record["video"]["uri"].removeprefix("file://")))
        video, audio = stream(meta, "video"), stream(meta, "audio")
        assert video["avg_frame_rate"] == "25/1", clip_id
        assert int(audio["sample_rate"]) == 16000 and int(audio["channels"]) == 1, clip_id
        assert float(meta["format"]["duration"]) == pytest.approx(expected_s[clip_id], abs=0.08)
        assert int(video["nb_frames"]) == round(expected_s[clip_id] * 25)
        if clip_id.startswith("celebvhq"):  # official expand-and-square crop applied
            assert video["width"] == video["height"], clip_id
    # one download per source: both HDTF clips share one raw artifact
    raws = {done[k]["raw"]["artifact_id"] for k in ("hdtf-RD-Alpha1_0", "hdtf-RD-Alpha1_1")}
    assert len(raws) == 1
    assert len(routes["hdtf/hdtfAlpha01.mp4"].hits) == len(routes["talkvid/-talkOk0001.mp4"].hits)
    busy = routes["celebvhq/celebBusy01.mp4"].hits
    assert len(busy) >= 2 and busy[1] - busy[0] >= 0.95, "Retry-After: 1 not honoured"

    progress = runner.invoke(
        app,
        [
            "sql",
            "--config",
            str(cfg),
            "--format",
            "json",
            "SELECT dataset, download_status, count(*) AS n FROM clip_progress "
            "GROUP BY ALL ORDER BY ALL",
        ],
    )
    assert progress.exit_code == 0, progress.output
    assert {(r["dataset"], r["download_status"]): r["n"] for r in json.loads(progress.output)} == {
        ("celebvhq", "bad_metadata"): 1,
        ("celebvhq", "done"): 3,
        ("hdtf", "done"): 2,
        ("hdtf", "failed"): 1,
        ("talkvid", "done"): 1,
        ("talkvid", "failed"): 1,
    }


def test_ingest_answers_questions_before_any_download(tmp_path: Path):
    cfg = _config(tmp_path, "http://127.0.0.1:9")  # nothing listens there: nothing is fetched
    runner = CliRunner()
    first = runner.invoke(app, ["ingest", "--config", str(cfg), "--format", "json"])
    assert first.exit_code == 0, first.output
    rows = {r["dataset"]: r for r in json.loads(first.output)}
    assert {k: (v["clips"], v["bad_rows"], v["ingest"]) for k, v in rows.items()} == {
        "hdtf": (3, 0, "new version"),
        "celebvhq": (3, 1, "new version"),
        "talkvid": (2, 0, "new version"),
    }
    assert "non-commercial" in rows["celebvhq"]["licence"].lower()
    again = runner.invoke(app, ["ingest", "--config", str(cfg), "--format", "json"])
    assert {r["ingest"] for r in json.loads(again.output)} == {"unchanged"}

    shown = runner.invoke(app, ["datasets", "--config", str(cfg), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    by_name = {r["dataset"]: r for r in json.loads(shown.output)}
    assert by_name["hdtf"]["hours"] == pytest.approx(6 / 3600, abs=1e-3)
    assert by_name["talkvid"]["languages"] == 2
    assert all(r["licence"] for r in by_name.values())

    query = (
        "SELECT language, count(*) AS clips, sum(duration_s) AS seconds FROM current_manifest "
        "WHERE dataset = 'talkvid' GROUP BY language ORDER BY language"
    )
    out = runner.invoke(app, ["sql", "--config", str(cfg), "--format", "json", query])
    assert json.loads(out.output) == [
        {"language": "Polish", "clips": 1, "seconds": 1.5},
        {"language": "Thai", "clips": 1, "seconds": 3.0},
    ]


@pytest.mark.skipif(not (FIXTURES / "hdtf").is_dir(), reason="../shared fixtures absent")
def test_ingest_real_published_metadata(tmp_path: Path):
    cfg = tmp_path / "real.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "download:\n"
        "  sample: {enabled: false}\n"
        "  datasets:\n"
        f"    - {{kind: hdtf, metadata: {FIXTURES / 'hdtf'}}}\n"
        f"    - {{kind: celebvhq, metadata: "
        f"{FIXTURES / 'celebvhq' / 'SYNTHETIC_celebvhq_info_schema_example.json'}}}\n"
        f"    - {{kind: talkvid, metadata: "
        f"{FIXTURES / 'talkvid' / 'README_example_record.DERIVED.json'}}}\n"
    )
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", "--config", str(cfg)]).exit_code == 0
    query = (
        "SELECT dataset, clips, bad_rows, round(hours, 2) AS hours, source_videos "
        "FROM manifest_summary ORDER BY dataset"
    )
    out = runner.invoke(app, ["sql", "--config", str(cfg), "--format", "json", query])
    assert json.loads(out.output) == [
        {"dataset": "celebvhq", "clips": 2, "bad_rows": 0, "hours": 0.0, "source_videos": 2},
        {"dataset": "hdtf", "clips": 436, "bad_rows": 1, "hours": 17.07, "source_videos": 368},
        {"dataset": "talkvid", "clips": 1, "bad_rows": 0, "hours": 0.0, "source_videos": 1},
    ]
