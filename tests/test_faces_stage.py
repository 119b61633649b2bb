"""The faces stage on real talking-face clips (skipped without ../shared) and edge cases.

Real clips are normalized to 25 fps first (two of the fixtures are 30 fps) and trimmed to
3 s to keep the test fast; detection runs at 320 px and crops are 128 px.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.face_detector import load_detector
from tasks.base import FailureKind, ItemFailure
from tasks.faces import BOXES_SCHEMA, LANDMARK_COLUMNS, FacesStage
from tasks.faces_config import FacesConfig
from tasks.media import count_frames, iter_frames, probe
from tasks.quality import QualityStage
from tasks.quality_config import QualityConfig
from tests.faces_helpers import (
    CLIPS,
    canvas,
    inputs_for,
    make_ctx,
    make_env,
    normalized_from_file,
    normalized_from_frames,
)

CROP_PX = 128
MARGIN = 0.5


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faces")
    cfg = FacesConfig(crop_size_px=CROP_PX, margin=MARGIN, detect_max_side_px=320)
    st = FacesStage(cfg, make_env(tmp))
    st.setup()
    return st


@pytest.mark.parametrize("name", ["face_4", "face_3"])  # 30 fps and 25 fps sources
def test_real_clip_is_tracked_and_cropped_on_the_face(stage, tmp_path, name):
    src = CLIPS / f"{name}.mp4"
    if not src.exists():
        pytest.skip("shared fixture clips are not present")
    clip = normalized_from_file(tmp_path, src, name, fps=25, max_duration_s=3.0)
    assert clip.fps == 25.0 and abs(clip.num_frames - 75) <= 1
    ctx = make_ctx(tmp_path, "faces", name)
    rec = stage.process(inputs_for(name, download=clip), ctx)

    # one crop per source frame, same fps, square crop size
    crops = ctx.local_path(rec.crops)
    info = probe(crops)
    assert (info.width, info.height) == (CROP_PX, CROP_PX) and info.fps == pytest.approx(25.0)
    assert rec.num_frames == clip.num_frames == count_frames(crops)
    assert rec.detector.startswith("mtcnn@")

    # the face is seen on every detection frame; everything else is tracked, nothing lost
    k = stage.config.detect_every_k
    expected_detected = len(set(range(0, rec.num_frames, k)) | {rec.num_frames - 1})
    assert rec.detected_frames == expected_detected
    assert rec.lost_frames == 0
    assert rec.detected_frames + rec.tracked_frames == rec.num_frames
    assert rec.max_faces_in_frame == 1 and rec.max_second_face_ratio == 0.0
    assert 150 < rec.min_face_size_px <= rec.median_face_size_px < 500

    table = pq.read_table(ctx.local_path(rec.boxes))
    assert table.schema.equals(BOXES_SCHEMA)
    cols = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    assert list(cols["frame"]) == list(range(rec.num_frames))
    detected = cols["source"] == "detected"
    lms = np.stack([cols[c].astype(float) for c in LANDMARK_COLUMNS], axis=1)
    assert not np.isnan(lms[detected]).any() and np.isnan(lms[~detected]).all()
    assert (cols["num_faces"][~cols["detector_ran"].astype(bool)] == -1).all()
    assert not cols["shot_change"].astype(bool).any()  # one continuous shot

    # boxes are stable frame to frame: the crop window moves a few pixels at most
    size = cols["crop_size"].astype(float)
    cx = cols["crop_x"].astype(float) + size / 2
    cy = cols["crop_y"].astype(float) + size / 2
    assert np.abs(np.diff(cx)).max() <= 0.03 * size.mean()
    assert np.abs(np.diff(cy)).max() <= 0.03 * size.mean()
    assert np.abs(np.diff(size)).max() <= 0.03 * size.mean()

    # an independent detection on the crops finds the face in the middle, at the right scale
    detector = load_detector("mtcnn", max_side_px=CROP_PX, num_threads=1)
    frames = np.concatenate(list(iter_frames(crops, CROP_PX, CROP_PX)))
    sample = frames[:: max(1, len(frames) // 6)]
    for dets in detector.detect(sample):
        assert dets, "no face in a crop"
        d = dets[0]
        centre = np.array([(d.x1 + d.x2) / 2, (d.y1 + d.y2) / 2])
        assert np.abs(centre - CROP_PX / 2).max() < 0.12 * CROP_PX
        assert d.size_px == pytest.approx(CROP_PX / (1 + MARGIN), rel=0.25)

    # and the real clip passes every quality rule with the default thresholds
    quality = QualityStage(QualityConfig(), stage.env)
    inputs = inputs_for(name, download=clip, faces=rec)
    verdict = quality.process(inputs, make_ctx(tmp_path, "quality", name))
    assert verdict.accepted and verdict.sampling_weight == 1.0, verdict.rules
    values = {r.rule: r.value for r in verdict.rules}
    assert values["speech"] > 0.5 and values["snr"] > 15 and values["lip_motion"] > 1.0


def test_blank_clip_fails_with_no_face(stage, tmp_path):
    clip = normalized_from_frames(tmp_path, "blank", [canvas() for _ in range(30)])
    with pytest.raises(ItemFailure) as e:
        stage.process(inputs_for("blank", download=clip), make_ctx(tmp_path, "faces", "blank"))
    assert e.value.kind == FailureKind.NO_FACE


def test_config_validates_geometry():
    with pytest.raises(ValueError):
        FacesConfig(crop_size_px=255)
    with pytest.raises(ValueError):
        FacesConfig(smoothing_window_frames=4)
    with pytest.raises(ValueError):
        FacesConfig(detector="haar")
    assert FacesConfig().params_hash() == FacesConfig(resources={"batch_size": 4}).params_hash()
