"""Quality rules on constructed clips: each defect is caught by its own rule and reason.

Clips are 320×240 at 25 fps with the astronaut's face (a real face MTCNN finds) pasted
on a plain canvas; the faces stage runs for real (MTCNN, 128 px crops) before quality.
``min_face_size_px`` is lowered to 80 because the pasted faces are ~90-100 px.
"""

from __future__ import annotations

import numpy as np
import pytest
from faces_helpers import inputs_for, make_ctx, make_env, moving_face_frames, normalized_from_frames

from tasks.base import FailureKind, ItemFailure
from tasks.faces import FacesConfig, FacesStage
from tasks.quality import RULES, QualityConfig, QualityStage, laplacian_variance
from tasks.records import QualityVerdict

QCFG = QualityConfig(min_face_size_px=80)
N = 55  # 2.2 s at 25 fps: just above the 2 s minimum


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    st = FacesStage(FacesConfig(crop_size_px=128), make_env(tmp_path_factory.mktemp("q")))
    st.setup()
    return st


def run(faces_stage, tmp_path, name, frames, qcfg=QCFG):
    clip = normalized_from_frames(tmp_path, name, frames)
    track = faces_stage.process(inputs_for(name, download=clip), make_ctx(tmp_path, "faces", name))
    return track, judge(tmp_path, name, clip, track, qcfg)


def judge(tmp_path, name, clip, track, qcfg=QCFG) -> QualityVerdict:
    stage = QualityStage(qcfg, make_env(tmp_path))
    inputs = inputs_for(name, download=clip, faces=track)
    verdict = stage.process(inputs, make_ctx(tmp_path, "quality", name))
    assert isinstance(verdict, QualityVerdict) and [r.rule for r in verdict.rules] == list(RULES)
    return verdict


def failed(verdict: QualityVerdict) -> dict[str, str]:
    return {r.rule: r.reason for r in verdict.rules if not r.passed}


def test_clean_clip_passes_every_rule(faces, tmp_path):
    _, v = run(faces, tmp_path, "clean", moving_face_frames(N))
    assert v.accepted and failed(v) == {} and v.rejection_reason() is None
    assert all(r.reason == "" and r.hard for r in v.rules)
    rows = v.stats_rows()["quality"]
    assert len(rows) == len(RULES) and all(r["accepted"] for r in rows)


def test_two_faces_side_by_side_fail_multi_face(faces, tmp_path):
    frames = moving_face_frames(
        N, face_px=130, path=lambda i: (175 + round(3 * np.sin(i / 5)), 55), extra_faces=[(15, 55)]
    )
    track, v = run(faces, tmp_path, "two", frames)
    assert track.max_faces_in_frame == 2 and track.max_second_face_ratio > 0.8
    assert set(failed(v)) == {"multi_face"}
    assert "second face" in failed(v)["multi_face"] and "2 faces" in failed(v)["multi_face"]
    assert not v.accepted and v.rejection_reason().startswith("multi_face: second face")


def test_blurred_clip_fails_blur(faces, tmp_path):
    clip = normalized_from_frames(tmp_path, "blurred", moving_face_frames(N, blur_sigma=6))
    ctx = make_ctx(tmp_path, "faces", "blurred")
    track = faces.process(inputs_for("blurred", download=clip), ctx)
    v = judge(tmp_path, "blurred", clip, track)
    assert set(failed(v)) == {"blur"}
    blur = next(r for r in v.rules if r.rule == "blur")
    assert blur.value < QCFG.min_blur_laplacian_var
    assert "Laplacian variance" in blur.reason and "blurry" in blur.reason
    # the same rule made soft keeps the clip with a lower sampling weight
    soft = QualityConfig(min_face_size_px=80, soft_rules=("blur",), soft_fail_weight=0.25)
    v_soft = judge(tmp_path, "blurred", clip, track, soft)
    assert v_soft.accepted and v_soft.sampling_weight == 0.25 and v_soft.rejection_reason() is None


def test_short_clip_fails_duration(faces, tmp_path):
    _, v = run(faces, tmp_path, "short", moving_face_frames(30))  # 1.2 s
    assert failed(v) == {"duration": "duration 1.20 s < 2.00 s"}


def test_small_face_fails_face_size(faces, tmp_path):
    track, v = run(faces, tmp_path, "small", moving_face_frames(N, face_px=60))
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
    track, v = run(lenient, tmp_path, "leaves-lenient", frames)
    assert track.lost_frames > 0.3 * track.num_frames
    assert set(failed(v)) == {"face_lost"}
    assert failed(v)["face_lost"].startswith("face lost in") and "> 30%" in failed(v)["face_lost"]


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
