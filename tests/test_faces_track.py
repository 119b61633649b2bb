"""Unit tests of tracking, gap handling, smoothing and crop geometry (no model, no media)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.face_detection import Detection
from tasks.base import FailureKind, ItemFailure
from tasks.faces_track import (
    SOURCE_DETECTED,
    SOURCE_INTERPOLATED,
    SOURCE_TRACKED,
    KeyframeObs,
    MainFaceTracker,
    build_track,
    crop_square,
    crop_windows,
    resize_square,
    smooth_track,
)

LM = tuple((float(i), float(i)) for i in range(5))


def det(x1: float, y1: float, side: float, score: float = 0.99) -> Detection:
    return Detection(x1, y1, x1 + side, y1 + side, score, LM)


def obs(frame: int, d: Detection | None, faces: int = 1) -> KeyframeObs:
    return KeyframeObs(frame, d, faces if d else 0, 0.0 if d else float("nan"))


def test_interpolates_between_detections_and_marks_sources():
    track = build_track(
        11, [obs(0, det(0, 0, 100)), obs(5, det(10, 0, 100)), obs(10, det(20, 0, 100))], 3
    )
    assert track.boxes[2, 0] == pytest.approx(4.0)
    assert track.boxes[7, 0] == pytest.approx(14.0)
    assert list(track.source[[0, 1, 5, 9, 10]]) == [
        SOURCE_DETECTED,
        SOURCE_TRACKED,
        SOURCE_DETECTED,
        SOURCE_TRACKED,
        SOURCE_DETECTED,
    ]
    assert track.count(SOURCE_DETECTED) == 3 and track.count(SOURCE_TRACKED) == 8
    assert track.count(SOURCE_INTERPOLATED) == 0
    assert np.isnan(track.landmarks[1]).all() and not np.isnan(track.landmarks[0]).any()
    assert track.num_faces[0] == 1 and track.num_faces[1] == -1
    assert track.detector_ran.sum() == 3


def test_short_gap_is_interpolated_and_counted_lost():
    o = [obs(0, det(0, 0, 100)), obs(3, None), obs(6, det(60, 0, 100))]
    track = build_track(7, o, max_gap_frames=5)
    assert list(track.source[1:6]) == [SOURCE_INTERPOLATED] * 5
    assert track.count(SOURCE_INTERPOLATED) == 5
    assert track.boxes[3, 0] == pytest.approx(30.0)
    assert track.gaps == [(1, 6)]


def test_long_gap_and_trailing_loss_fail_with_face_lost():
    o = [obs(0, det(0, 0, 100)), obs(3, None), obs(6, det(60, 0, 100))]
    with pytest.raises(ItemFailure) as e:
        build_track(7, o, max_gap_frames=4)
    assert e.value.kind == FailureKind.FACE_LOST and "5 frames" in e.value.message
    # the face leaves for good after frame 5: frames 6..19 are a trailing gap
    o = [
        obs(0, det(0, 0, 100)),
        obs(5, det(0, 0, 100)),
        obs(10, None),
        obs(15, None),
        obs(19, None),
    ]
    with pytest.raises(ItemFailure) as e:
        build_track(20, o, max_gap_frames=10)
    assert e.value.kind == FailureKind.FACE_LOST and "frames 6-19" in e.value.message
    # with a lenient gap the held box covers the tail and those frames count as lost
    track = build_track(20, o, max_gap_frames=100)
    assert track.count(SOURCE_INTERPOLATED) == 14
    assert np.allclose(track.boxes[19], track.boxes[5])


def test_no_face_anywhere_fails_with_no_face():
    with pytest.raises(ItemFailure) as e:
        build_track(10, [obs(0, None), obs(5, None), obs(9, None)], 5)
    assert e.value.kind == FailureKind.NO_FACE


def test_tracker_prefers_continuity_and_measures_second_face():
    t = MainFaceTracker(min_score=0.9, min_iou=0.3, max_gap_frames=10)
    first = t.update(0, [det(100, 100, 50), det(10, 10, 30), det(300, 10, 200, score=0.5)])
    assert first.main == det(100, 100, 50)  # largest confident face; the 0.5 one is ignored
    assert first.num_faces == 2 and first.second_face_ratio == pytest.approx(30 / 50)
    # a bigger face appears elsewhere: the track stays on the face that overlaps
    nxt = t.update(5, [det(300, 300, 120), det(104, 102, 50)])
    assert nxt.main == det(104, 102, 50)
    assert nxt.second_face_ratio == pytest.approx(120 / 50)
    # only a non-overlapping face: a miss, not a jump
    assert t.update(10, [det(300, 300, 120)]).main is None


def test_smoothing_reduces_jitter_and_keeps_constant_tracks():
    rng = np.random.default_rng(0)
    n = 100
    base = np.tile([100.0, 100.0, 200.0, 200.0], (n, 1))
    noisy = base + rng.normal(0, 3, size=(n, 4))
    raw = smooth_track(noisy, "none", 9)
    smooth = smooth_track(noisy, "moving_average", 9)
    for r, s in zip(raw, smooth, strict=True):  # centre x, centre y, side
        assert np.abs(np.diff(s)).mean() < 0.3 * np.abs(np.diff(r)).mean()
    cx_c, cy_c, side_c = smooth_track(base, "moving_average", 9)
    assert np.allclose(cx_c, 150) and np.allclose(cy_c, 150) and np.allclose(side_c, 100)
    x, y, size = crop_windows(cx_c, cy_c, side_c, margin=0.5)
    assert (size == 150).all() and (x == 75).all() and (y == 75).all()


def test_crop_square_pads_outside_the_frame():
    frame = np.full((100, 100, 3), 200, np.uint8)
    crop = crop_square(frame, -50, -50, 100, 50, "constant")
    assert crop.shape == (50, 50, 3)
    assert crop[:20, :20].max() == 0 and crop[30:, 30:].min() == 200
    edge = crop_square(frame, -50, -50, 100, 50, "edge")
    assert edge.min() == 200
    inside = crop_square(
        np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3), 10, 20, 32, 32
    )
    assert inside.shape == (32, 32, 3)
    assert (crop_square(frame, 500, 500, 40, 16) == 0).all()


def test_resize_square_matches_an_area_resize():
    from skimage import data

    img = data.astronaut()  # 512 px, a real photo
    for size in (512, 400, 300):  # 2x exactly, then two non-integer factors
        region = np.ascontiguousarray(img[:size, :size])
        ours = resize_square(region, 256).astype(float)
        area = cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA).astype(float)
        psnr = 10 * np.log10(255**2 / max(((ours - area) ** 2).mean(), 1e-12))
        assert psnr > 45, (size, psnr)
        if size == 512:
            assert np.array_equal(ours, area)
    assert resize_square(img[:100, :100], 256).shape == (256, 256, 3)  # upscales bilinearly
