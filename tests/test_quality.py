"""Quality rules on constructed clips: each defect is caught by its own rule and reason.

Clips are 320×240 at 25 fps with the astronaut's face (a real face MTCNN finds) pasted
on a plain canvas, its mouth opening and closing; the faces stage runs for real (MTCNN,
128 px crops) before quality. ``min_face_size_px`` is lowered to 80 because the pasted
faces are ~90-100 px.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.base import FailureKind, ItemFailure
from tasks.faces import FacesStage
from tasks.faces_config import FacesConfig
from tasks.media import read_wav, write_wav
from tasks.quality import QualityStage, laplacian_variance
from tasks.quality_config import RULES, QualityConfig
from tasks.records import QualityVerdict
from tests.faces_helpers import (
    astronaut_face,
    canvas,
    inputs_for,
    make_ctx,
    make_env,
    moving_face_frames,
    normalized_from_frames,
    paste,
)

# most clips here are silent (the visual rules are under test): the speech floor is off
QCFG = QualityConfig(min_face_size_px=80, min_speech_fraction_floor=0.0)
WITH_FLOOR = QualityConfig(min_face_size_px=80)
N = 55  # 2.2 s at 25 fps: just above the 2 s minimum


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    st = FacesStage(FacesConfig(crop_size_px=128), make_env(tmp_path_factory.mktemp("q")))
    st.setup()
    return st


def run(faces_stage, tmp_path, name, frames, qcfg=QCFG, speech=False):
    clip = normalized_from_frames(tmp_path, name, frames, speech=speech)
    track = faces_stage.process(inputs_for(name, download=clip), make_ctx(tmp_path, "faces", name))
    return clip, track, judge(tmp_path, name, clip, track, qcfg)


def judge(tmp_path, name, clip, track, qcfg=QCFG) -> QualityVerdict:
    stage = QualityStage(qcfg, make_env(tmp_path))
    inputs = inputs_for(name, download=clip, faces=track)
    verdict = stage.process(inputs, make_ctx(tmp_path, "quality", name))
    assert isinstance(verdict, QualityVerdict) and [r.rule for r in verdict.rules] == list(RULES)
    return verdict


def failed(verdict: QualityVerdict, hard: bool | None = True) -> dict[str, str]:
    """Failed rules and reasons (hard ones by default; ``hard=None`` for all)."""
    return {
        r.rule: r.reason for r in verdict.rules if not r.passed and (hard is None or r.hard == hard)
    }


def test_clean_talking_clip_passes_every_rule(faces, tmp_path):
    clip, track, v = run(faces, tmp_path, "clean", moving_face_frames(N), speech=True)
    assert v.accepted and failed(v, hard=None) == {} and v.rejection_reason() is None
    assert v.sampling_weight == 1.0
    assert all(r.reason == "" for r in v.rules if r.rule != "av_offset")
    offset = next(r for r in v.rules if r.rule == "av_offset")
    # 2.2 s clip: too short to measure, which is a visible verdict, not a measured pass
    assert offset.passed and not offset.measured and offset.reason.startswith("unmeasured")
    assert all(r.measured for r in v.rules if r.rule != "av_offset")
    assert {r.rule for r in v.rules if not r.hard} == {"yaw", "lip_motion", "speech", "snr"}
    rows = v.stats_rows()["quality"]
    assert len(rows) == len(RULES) and all(r["accepted"] for r in rows)

    # the same clip without speech, then with noisy speech: the audio rules object softly
    ctx = make_ctx(tmp_path, "download", "clean-audio")
    speech, rate = read_wav(ctx.local_path(clip.audio))
    silent, noisy = ctx.scratch / "silent.wav", ctx.scratch / "noisy.wav"
    write_wav(silent, np.zeros_like(speech), rate)
    noise = np.random.default_rng(0).normal(0, 0.05, speech.shape).astype(np.float32)
    write_wav(noisy, speech + noise, rate)
    for wav, expected in ((silent, {"speech", "snr"}), (noisy, {"snr"})):
        audio = ctx.commit(wav, wav.name, "audio")
        v = judge(tmp_path, "clean", clip.model_copy(update={"audio": audio}), track, WITH_FLOOR)
        assert set(failed(v, hard=False)) == expected
        if wav is silent:  # no speech at all: the hard floor rejects it
            assert not v.accepted and failed(v, hard=True) == {
                "speech_floor": "no usable speech: 0% of the clip < 5% "
                "(an audio-driven model cannot learn from it)"
            }
            assert v.rejection_reason().startswith("speech_floor: no usable speech")
        else:
            assert v.accepted and failed(v) == {}
        assert v.sampling_weight == QCFG.soft_fail_weight ** len(expected)
        reasons = failed(v, hard=False)
        assert reasons["snr"].startswith("noisy audio: SNR")
        if "speech" in expected:
            assert reasons["speech"] == "speech in 0% of the clip < 30%"
            assert reasons["snr"].endswith("(no speech found)")


def test_two_faces_side_by_side_fail_multi_face(faces, tmp_path):
    frames = moving_face_frames(
        N, face_px=130, path=lambda i: (175 + round(3 * np.sin(i / 5)), 55), extra_faces=[(15, 55)]
    )
    _, track, v = run(faces, tmp_path, "two", frames)
    assert track.max_faces_in_frame == 2 and track.max_second_face_ratio > 0.8
    assert set(failed(v)) == {"multi_face"}
    assert "second face" in failed(v)["multi_face"] and "2 faces" in failed(v)["multi_face"]
    assert not v.accepted and v.rejection_reason().startswith("multi_face: second face")


def test_blurred_clip_fails_blur(faces, tmp_path):
    frames = moving_face_frames(N, blur_sigma=6, talking=False)
    clip, track, v = run(faces, tmp_path, "blurred", frames)
    assert set(failed(v)) == {"blur"}
    blur = next(r for r in v.rules if r.rule == "blur")
    assert blur.value < QCFG.min_blur_laplacian_var
    assert "Laplacian variance" in blur.reason and "blurry" in blur.reason
    # with blur made soft the clip is kept, its weight lowered once per failed soft rule
    soft = QualityConfig(
        min_face_size_px=80,
        min_speech_fraction_floor=0.0,
        soft_rules=(*QCFG.soft_rules, "blur"),
        soft_fail_weight=0.25,
    )
    v_soft = judge(tmp_path, "blurred", clip, track, soft)
    soft_failures = len(failed(v_soft, hard=False))
    assert "blur" in failed(v_soft, hard=False)
    assert v_soft.accepted and v_soft.rejection_reason() is None
    assert v_soft.sampling_weight == pytest.approx(0.25**soft_failures)


def test_short_clip_fails_duration(faces, tmp_path):
    _, _, v = run(faces, tmp_path, "short", moving_face_frames(30))  # 1.2 s
    assert failed(v) == {"duration": "duration 1.20 s < 2.00 s"}


def test_small_face_fails_face_size(faces, tmp_path):
    _, track, v = run(faces, tmp_path, "small", moving_face_frames(N, face_px=60))
    assert set(failed(v)) == {"face_size"}
    assert failed(v)["face_size"] == f"face {track.median_face_size_px:.0f} px < 80 px"
    assert track.median_face_size_px < 60


def test_face_leaving_the_frame_is_lost(faces, tmp_path):
    def leaves(i: int) -> tuple[int, int]:  # steady, then slides out to the right
        return 85 + max(0, i - 20) * 12, 45

    frames = moving_face_frames(N, path=leaves)
    clip = normalized_from_frames(tmp_path, "leaves", frames)
    with pytest.raises(ItemFailure) as e:
        faces.process(inputs_for("leaves", download=clip), make_ctx(tmp_path, "faces", "leaves"))
    assert e.value.kind == FailureKind.FACE_LOST and "lost for" in e.value.message

    # with long gaps tolerated, the faces stage keeps the clip and quality rejects it
    lenient = FacesStage(FacesConfig(crop_size_px=128, max_gap_frames=1000), faces.env)
    lenient.setup()
    _, track, v = run(lenient, tmp_path, "leaves-lenient", frames)
    assert track.lost_frames > 0.3 * track.num_frames
    assert set(failed(v)) == {"face_lost"}
    assert failed(v)["face_lost"].startswith("face lost in") and "> 30%" in failed(v)["face_lost"]


def test_hard_cut_fails_shot_change(faces, tmp_path):
    first = moving_face_frames(28)
    # the second shot: same person, mirrored, closer, on a different background
    second = [
        cv2.resize(np.ascontiguousarray(f[:, ::-1]), (320, 240))
        for f in moving_face_frames(27, face_px=170)
    ]
    tint = np.array([40, -20, 30], np.int16)
    second = [np.clip(f.astype(np.int16) + tint, 0, 255).astype(np.uint8) for f in second]
    _, track, v = run(faces, tmp_path, "cut", first + second)
    boxes = pq.read_table(make_ctx(tmp_path, "x", "x").local_path(track.boxes))
    cuts = np.flatnonzero(boxes.column("shot_change").to_numpy(zero_copy_only=False))
    assert list(cuts) == [28]
    assert track.lost_frames == 0  # the track restarts on the new shot instead of losing it
    assert failed(v) == {"shot_change": "1 shot change(s) > 0"}


def test_frozen_face_fails_lip_motion_softly(faces, tmp_path):
    frames = moving_face_frames(N, talking=False, path=lambda i: (85, 45))
    _, _, v = run(faces, tmp_path, "frozen", frames, speech=True)
    assert failed(v) == {}  # no hard failure: kept
    lip = next(r for r in v.rules if r.rule == "lip_motion")
    assert not lip.passed and not lip.hard and lip.value < 0.5
    assert lip.reason.startswith("mouth still")
    assert v.accepted and v.sampling_weight == QCFG.soft_fail_weight


def test_turned_head_fails_yaw_softly(faces, tmp_path):
    """Real run, then the nose landmarks moved towards one eye as on a turned head."""
    clip, track, v = run(faces, tmp_path, "yaw", moving_face_frames(N), speech=True)
    assert next(r for r in v.rules if r.rule == "yaw").passed
    ctx = make_ctx(tmp_path, "faces", "yaw-turned")
    table = pq.read_table(ctx.local_path(track.boxes))
    cols = {c: table.column(c).to_numpy(zero_copy_only=False).copy() for c in table.column_names}
    # slide each nose along the eye axis until it sits half an eye distance off centre
    ax, ay = cols["lm_x1"] - cols["lm_x0"], cols["lm_y1"] - cols["lm_y0"]
    along = (
        (cols["lm_x2"] - (cols["lm_x0"] + cols["lm_x1"]) / 2) * ax
        + (cols["lm_y2"] - (cols["lm_y0"] + cols["lm_y1"]) / 2) * ay
    ) / (ax**2 + ay**2)
    cols["lm_x2"] = cols["lm_x2"] + (0.5 - along) * ax  # ≈ 40° turn
    cols["lm_y2"] = cols["lm_y2"] + (0.5 - along) * ay
    turned = ctx.scratch / "boxes.parquet"
    pq.write_table(pa.table(cols, schema=table.schema), turned)
    track = track.model_copy(update={"boxes": ctx.commit(turned, "boxes.parquet", "table")})
    v = judge(tmp_path, "yaw-turned", clip, track)
    yaw = next(r for r in v.rules if r.rule == "yaw")
    assert not yaw.passed and yaw.value == pytest.approx(0.5, abs=0.01)
    assert yaw.reason == "head turned: yaw ratio 0.50 > 0.35"
    assert v.accepted and v.sampling_weight == QCFG.soft_fail_weight


def test_laplacian_variance_orders_sharpness():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert laplacian_variance(flat) == 0.0
    assert laplacian_variance(sharp) > 1000
    # only the central region counts: a sharp border around a flat centre reads as flat
    framed = sharp.copy()
    framed[16:48, 16:48] = 128
    assert laplacian_variance(framed, center_fraction=0.4) == 0.0


def test_helpers_paint_a_real_face():
    """Guard for the fixtures: the pasted face must be the photo, mouth painted when asked."""
    closed, opened = astronaut_face(100), astronaut_face(100, mouth_open=1.0)
    assert closed.shape == (100, 100, 3) and np.abs(closed.astype(int) - opened).sum() > 0
    f = paste(canvas(), closed, 300, 200)  # clipped at the corner, no error
    assert (f[200:, 300:] == closed[:40, :20]).all()


def test_unmeasured_is_a_verdict_of_its_own_in_the_catalog(tmp_path):
    """The quality table stores ``measured``; ``quality_rules`` (``talkforge quality``,
    dashboards/03) counts unmeasured clips apart from passes; the histogram leaves their
    best guesses out of the measured values."""
    from datetime import UTC, datetime

    from storage.catalog import Catalog
    from talkforge.ops import quality_rules, score_histogram
    from tasks.records import RuleResult

    def rule(value: float, measured: bool) -> RuleResult:
        reason = "" if measured else "unmeasured offset (confidence 1.20 < 3.00)"
        return RuleResult(
            rule="av_offset", value=value, threshold=100.0, passed=True, measured=measured,
            reason=reason,
        )  # fmt: skip

    verdicts = {
        "a": [rule(40.0, True), rule(20.0, True)],
        "b": [rule(-300.0, False)],
        "c": [RuleResult(rule="av_offset", value=250.0, threshold=100.0, passed=False)],
    }
    now = datetime.now(UTC)
    rows: dict[str, list[dict]] = {"plans": [], "items": [], "clips": [], "quality": []}
    for clip, rules in verdicts.items():
        base = {"run_id": "r", "item_id": clip, "item_key": "k", "created_at": now}
        rows["plans"] += [
            {"run_id": "r", "stage": stage, "item_id": clip, "item_key": "k", "planned_at": now}
            for stage in ("download", "quality")
        ]
        rows["items"] += [
            {**base, "stage": stage, "status": "done", "attempt": 1}
            for stage in ("download", "quality")
        ]
        rows["clips"].append({**base, "stage": "download", "dataset": "d"})
        verdict = QualityVerdict(clip_id=clip, accepted=True, rules=rules[-1:])
        rows["quality"] += [
            {**base, "stage": "quality", **r} for r in verdict.stats_rows()["quality"]
        ]
    catalog = Catalog(tmp_path / "catalog")
    catalog.append_many(rows)
    stored = catalog.query("SELECT item_id, passed, measured FROM current_quality ORDER BY 1")
    assert stored.to_pylist() == [
        {"item_id": "a", "passed": True, "measured": True},
        {"item_id": "b", "passed": True, "measured": False},
        {"item_id": "c", "passed": False, "measured": True},
    ]
    (summary,) = quality_rules(catalog)
    assert (summary["clips"], summary["passed"], summary["failed"], summary["unmeasured"]) == (
        3, 1, 1, 1
    )  # fmt: skip
    dashboard = Path(__file__).parents[1] / "dashboards" / "03_quality_rules.sql"
    (row,) = catalog.query_readonly(dashboard.read_text()).to_pylist()
    assert (row["passed"], row["unmeasured"], row["attention"]) == (1, 1, "")
    histogram = score_histogram(catalog, "av_offset", bins=2)
    assert sum(b["clips"] for b in histogram if b["from"] is not None) == 2  # 20 and 250 ms
    assert histogram[-1] == {
        "from": None, "to": None, "clips": 1, "bar": "not measurable", "threshold_here": False
    }  # fmt: skip
