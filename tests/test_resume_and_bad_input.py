"""Crash safety and bad input, through the real CLI.

- A run killed with SIGKILL in the middle of a stage, then resumed, finishes with nothing
  lost, nothing duplicated in the current view, and every checksum valid; items committed
  before the kill are not redone.
- A dataset with a truncated mp4, a file with no audio stream, a zero-byte file and an id
  that tries to escape its folder: each becomes a typed failure row while the good clip
  completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from storage.catalog import Catalog
from storage.store import ArtifactRef, ArtifactStore
from talkforge import ops
from talkforge.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "default.yaml")


def _cli(root: Path, sample: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "talkforge.cli",
        *args,
        "--config",
        CONFIG,
        "--set",
        f"project.data_root={root}",
        "--set",
        f"download.sample.dir={sample}",
    ]


def _done(cat: Catalog, stage: str) -> int:
    rows = cat.query(
        "SELECT count(*) AS n FROM items WHERE stage = ? AND status = 'done'", [stage]
    ).to_pylist()
    return rows[0]["n"]


def test_resume_after_sigkill_loses_and_duplicates_nothing(
    tmp_path: Path, sample_dir: Path
) -> None:
    root = tmp_path / "data"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        *_cli(root, sample_dir, "run"),
        "--until",
        "faces",
        "--limit",
        "3",
        "--set",
        "execution.commit_every=1",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    cat = Catalog(root / "catalog")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (root / "catalog" / "catalog.sqlite").exists() and _done(cat, "faces") >= 1:
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _done(cat, "faces")
    assert 1 <= done_before < 3, "the kill must land in the middle of the faces stage"

    resume = subprocess.run(
        _cli(root, sample_dir, "resume", "latest"),
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stderr.decode()[-3000:]

    current = cat.query(
        "SELECT stage, count(*) AS n, count(DISTINCT item_id) AS d, "
        "count(*) FILTER (WHERE status = 'done') AS done "
        "FROM current_items GROUP BY stage ORDER BY stage"
    ).to_pylist()
    assert current == [
        {"stage": "download", "n": 3, "d": 3, "done": 3},
        {"stage": "faces", "n": 3, "d": 3, "done": 3},
    ]
    # items committed before the kill were not redone: one done row per faces key
    per_key = cat.query(
        "SELECT item_key, count(*) AS n FROM items WHERE stage = 'faces' "
        "AND status = 'done' GROUP BY item_key"
    ).to_pylist()
    assert all(r["n"] == 1 for r in per_key) and len(per_key) == 3
    store = ArtifactStore(str(root / "store"))
    arts = cat.query(
        "SELECT artifact_id, kind, name, uri, size_bytes, sha256 FROM current_artifacts"
    ).to_pylist()
    assert len(arts) >= 3 * 3  # per clip: clip.mp4, audio.wav, crops.mp4 (+ raw, boxes)
    for a in arts:
        assert store.verify(ArtifactRef(**a)), a["uri"]
    # the resumed run reports every planned item settled, nothing pending or failed
    latest = ops.latest_run_id(cat)
    for row in ops.stage_status(cat, latest):
        assert row["pending"] == 0 and row["failed"] == 0 and row["items"] == 3, row


def _write_bad_dataset(base: Path, sample_dir: Path) -> Path:
    """An HDTF-format dataset: one good source and four broken ones."""
    meta, videos = base / "meta", base / "videos"
    meta.mkdir(parents=True)
    videos.mkdir()
    good = sorted((sample_dir / "videos").glob("*.mp4"))[0]
    shutil.copy(good, videos / "goodgood001.mp4")
    data = good.read_bytes()
    (videos / "trunctrunc1.mp4").write_bytes(data[: len(data) // 3])
    (videos / "emptyempty1.mp4").write_bytes(b"")
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(good),
            "-an",
            "-c:v",
            "copy",
            str(videos / "noaudionoau.mp4"),
        ],
        check=True,
    )
    names = {
        "Good": "goodgood001",
        "Trunc": "trunctrunc1",
        "Empty": "emptyempty1",
        "NoAudio": "noaudionoau",
        "../../evil": "evilevil001",
    }
    (meta / "RD_video_url.txt").write_text(
        "".join(f"{n} https://www.youtube.com/watch?v={i}\n" for n, i in names.items())
    )
    (meta / "RD_resolution.txt").write_text("".join(f"{n}.mp4 480\n" for n in names))
    (meta / "RD_annotion_time.txt").write_text("".join(f"{n}.mp4 00:01-00:05\n" for n in names))
    (meta / "RD_crop_wh.txt").write_text("")
    (meta / "RD_crop_ratio.txt").write_text("")
    return base


def test_bad_inputs_become_typed_failures_and_the_rest_completes(
    tmp_path: Path, sample_dir: Path, ray_session: None
) -> None:
    ds = _write_bad_dataset(tmp_path / "bad", sample_dir)
    root = tmp_path / "data"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"project: {{data_root: {root}}}\n"
        "download:\n"
        "  sample: {enabled: false}\n"
        "  datasets:\n"
        f"    - {{kind: hdtf, metadata: {ds / 'meta'}, subsets: [RD],\n"
        f"       url_template: 'file://{ds / 'videos'}/{{id}}.mp4'}}\n"
        "quality: {min_face_size_px: 96}\n"
    )
    result = CliRunner().invoke(
        app, ["run", "--config", str(cfg), "--until", "quality"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    cat = Catalog(root / "catalog")
    fails = {
        r["item_id"]: r
        for r in cat.query(
            "SELECT item_id, error_kind, retryable FROM current_failures"
        ).to_pylist()
    }
    kinds = {k: v["error_kind"] for k, v in fails.items()}
    assert kinds.get("hdtf-RD-Trunc_0") == "format", kinds
    assert kinds.get("hdtf-RD-Empty_0") == "format", kinds
    assert kinds.get("hdtf-RD-NoAudio_0") == "format", kinds
    escaped = [k for k in kinds if "evil" in k]
    assert escaped and kinds[escaped[0]] == "bad_metadata", kinds
    assert not any(v["retryable"] for v in fails.values())
    done = cat.query(
        "SELECT stage, item_id FROM current_items WHERE status IN ('done', 'filtered')"
    ).to_pylist()
    assert {(r["stage"], r["item_id"]) for r in done} == {
        ("download", "hdtf-RD-Good_0"),
        ("faces", "hdtf-RD-Good_0"),
        ("quality", "hdtf-RD-Good_0"),
    }
    assert not list(root.rglob("evil*")), "an escaping id must never become a path"
    out = CliRunner().invoke(
        app, ["failures", "--config", str(cfg), "--kind", "format", "--format", "json"]
    )
    assert out.exit_code == 0, out.output
    listed = {row["item_id"] for row in json.loads(out.output)}
    assert listed == {"hdtf-RD-Trunc_0", "hdtf-RD-Empty_0", "hdtf-RD-NoAudio_0"}
