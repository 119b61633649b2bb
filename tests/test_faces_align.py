"""Crop geometry as affines and landmark alignment: exact maps, then a rolling head."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.face_detector import load_detector
from tasks.faces import AFFINE_COLUMNS, FacesStage
from tasks.faces_align import (
    ARCFACE_TEMPLATE_112,
    affine_square,
    aligned_affines,
    box_affines,
    warp_crop,
)
from tasks.faces_config import FacesConfig
from tasks.faces_track import crop_square
from tasks.media import iter_frames
from tasks.quality_measures import read_boxes
from tests.faces_helpers import (
    astronaut_face,
    canvas,
    inputs_for,
    make_ctx,
    make_env,
    normalized_from_frames,
    paste,
)


def rotate_points(
    p: np.ndarray, deg: float, scale: float, shift: tuple[float, float]
) -> np.ndarray:
    t = np.deg2rad(deg)
    r = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return p @ r.T + np.asarray(shift)


def test_aligned_affine_maps_landmarks_exactly_onto_the_template():
    crop_px, margin = 128, 0.5
    template = (ARCFACE_TEMPLATE_112 - 56) * (crop_px / (1 + margin) / 112) + crop_px / 2
    frames = [rotate_points(ARCFACE_TEMPLATE_112, deg, 2.5, (300, 120)) for deg in (-20, 0, 35)]
    lm = np.stack([f.reshape(10) for f in frames])
    m = aligned_affines(lm, crop_px, margin, "none", 1)
    for i, f in enumerate(frames):
        mapped = f @ m[i, :, :2].T + m[i, :, 2]
        np.testing.assert_allclose(mapped, template, atol=1e-6)
    # missing landmarks are interpolated between neighbours
    lm_gap = np.vstack([lm[0], np.full(10, np.nan), lm[0]])
    m_gap = aligned_affines(lm_gap, crop_px, margin, "none", 1)
    np.testing.assert_allclose(m_gap[1], m_gap[0], atol=1e-9)


def test_box_affine_matches_square_crops():
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (0, 0), 2)
    x, y, size = np.array([30]), np.array([10]), np.array([64])
    m = box_affines(x, y, size, 64)
    np.testing.assert_allclose(m[0], [[1, 0, -30], [0, 1, -10]])
    warped = warp_crop(frame, m[0], 64, "constant")
    assert np.array_equal(warped, crop_square(frame, 30, 10, 64, 64))
    sx, sy, ss = affine_square(box_affines(x, y, np.array([100]), 50), 50)
    assert (sx[0], sy[0], ss[0]) == (30, 10, 100)
    # a 4x downscale goes through area averaging and stays close to the area resize
    m4 = box_affines(np.array([0]), np.array([0]), np.array([120]), 30)[0]
    small = warp_crop(frame, m4, 30, "edge").astype(float)
    ref = cv2.resize(frame[:, :120], (30, 30), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(small - ref).mean() < 6


def rolling_face_frames(n: int) -> list[np.ndarray]:
    """The astronaut's head rolling between -20° and +20° in the middle of the frame."""
    face = astronaut_face(150)
    frames = []
    for i in range(n):
        deg = 20 * np.sin(2 * np.pi * i / n)
        r = cv2.getRotationMatrix2D((75, 75), deg, 1.0)
        patch = cv2.warpAffine(face, r, (150, 150), borderMode=cv2.BORDER_REPLICATE)
        frames.append(paste(canvas(), patch, 85, 45))
    return frames


def eye_tilt(detector, crops: np.ndarray) -> np.ndarray:
    """|eye dy| / eye distance per crop (0 = level eyes)."""
    out = []
    for dets in detector.detect(crops):
        assert dets, "no face in a crop"
        (lx, ly), (rx, ry) = dets[0].landmarks[:2]
        out.append(abs(ry - ly) / np.hypot(rx - lx, ry - ly))
    return np.array(out)


@pytest.mark.parametrize("align", ["box", "landmarks"])
def test_landmark_alignment_levels_a_rolling_head(tmp_path, align):
    clip = normalized_from_frames(tmp_path, "roll", rolling_face_frames(40))
    stage = FacesStage(
        FacesConfig(crop_size_px=128, align=align, detect_every_k=2), make_env(tmp_path)
    )
    stage.setup()
    ctx = make_ctx(tmp_path, "faces", "roll")
    rec = stage.process(inputs_for("roll", download=clip), ctx)
    boxes = read_boxes(ctx.local_path(rec.boxes))
    m = np.stack([boxes[c] for c in AFFINE_COLUMNS], 1).reshape(-1, 2, 3)
    angle = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
    crops = np.concatenate(list(iter_frames(ctx.local_path(rec.crops), 128, 128)))
    assert len(crops) == rec.num_frames == 40
    detector = load_detector("mtcnn", max_side_px=128, num_threads=1)
    tilt = eye_tilt(detector, crops[::4])
    if align == "box":
        assert np.allclose(angle, 0) and tilt.max() > 0.25  # the crops roll with the head
    else:
        # the crop counter-rotates with the head (up to smoothing lag) and the eyes stay level
        assert angle.max() > 12 and angle.min() < -12
        assert tilt.max() < 0.12
