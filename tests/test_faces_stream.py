"""The single-pass faces stream against the whole-clip computation it replaced.

The reference below is the former two-pass stage's algorithm: score every frame, find the
cuts, run the full detection on every keyframe, track over them, then build the track and
the crop geometry from the whole clip with the pure functions of ``tasks.faces_track`` and
``tasks.faces_align``. Real clips come from ``../shared/fixtures/clips`` (skipped without).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.face_detection import iou
from models.face_detector import load_detector
from tasks.base import FailureKind, ItemFailure
from tasks.faces_align import affine_square, aligned_affines, box_affines
from tasks.faces_config import FacesConfig
from tasks.faces_keyframes import KeyframeDetector
from tasks.faces_shots import ContentScorer, detect_cuts
from tasks.faces_stream import FaceStream
from tasks.faces_track import (
    KeyframeObs,
    MainFaceTracker,
    build_track,
    crop_windows,
    smooth_track,
)
from tasks.media import iter_frames, run_ffmpeg
from tests.faces_helpers import CLIPS, canvas, moving_face_frames


@pytest.fixture(scope="module")
def detector():
    return load_detector("mtcnn", max_side_px=480, min_face_size_px=40, num_threads=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, np.ndarray]:
    """3 s of face_3 (590 px) and face_1 (700 px) at 25 fps, decoded."""
    if not (CLIPS / "face_3.mp4").exists():
        pytest.skip("shared fixture clips are not present")
    out = {}
    for name in ("face_3", "face_1"):
        dst = tmp_path_factory.mktemp(name) / "clip.mp4"
        run_ffmpeg(
            ["-i", str(CLIPS / f"{name}.mp4"), "-t", "3", "-vf", "fps=25", "-an", "-c:v",
             "libx264", "-crf", "18", "-pix_fmt", "yuv420p", str(dst)],
            "normalize test clip",
        )  # fmt: skip
        side = 590 if name == "face_3" else 700
        out[name] = np.concatenate(list(iter_frames(dst, side, side)))
    return out


def keyframes_for(cfg: FacesConfig, detector, frames: np.ndarray) -> KeyframeDetector:
    return KeyframeDetector(
        detector,
        frames.shape[2],
        frames.shape[1],
        max_side_px=cfg.detect_max_side_px,
        min_face_px=cfg.detect_min_face_px,
        adaptive=cfg.adaptive_detection,
        adaptive_face_px=cfg.adaptive_face_px,
        adaptive_min_face_ratio=cfg.adaptive_min_face_ratio,
    )


def stream(cfg: FacesConfig, keyframes: KeyframeDetector, frames: np.ndarray, chunk: int):
    """Feed ``frames`` in chunks; returns (stream, result or the failure, largest buffer)."""
    s = FaceStream(cfg, keyframes, None)
    largest = 0
    for i in range(0, len(frames), chunk):
        s.feed(frames[i : i + chunk])
        largest = max(largest, len(s.buffer))
    try:
        return s, s.finish(), largest
    except ItemFailure as failure:
        return s, failure, largest


def whole_clip(cfg: FacesConfig, detector, frames: np.ndarray):
    """The two-pass stage's computation: observations, track, affines, squares, cuts."""
    n, k = len(frames), cfg.detect_every_k
    scorer = ContentScorer()
    scorer.add(frames)
    cuts = detect_cuts(scorer.scores, cfg.shot_min_content, cfg.shot_adaptive_ratio)
    keys = sorted(set(range(0, n, k)) | {n - 1})
    dets = [d for i in range(0, len(keys), 16) for d in detector.detect(frames[keys[i : i + 16]])]
    tracker = MainFaceTracker(cfg.min_detection_score, cfg.min_track_iou, cfg.max_gap_frames)
    observations, prev = [], -1
    for f, d in zip(keys, dets, strict=True):
        if np.any((cuts > prev) & (cuts <= f)):
            tracker.reset()
        observations.append(tracker.update(f, d))
        prev = f
    track = build_track(n, observations, cfg.max_gap_frames)
    affines, squares = geometry(cfg, track.boxes, track.landmarks)
    return observations, track, affines, squares, cuts, scorer.scores


def geometry(cfg: FacesConfig, boxes: np.ndarray, landmarks: np.ndarray):
    px, window = cfg.crop_size_px, cfg.smoothing_window_frames
    if cfg.align == "landmarks":
        affines = aligned_affines(landmarks, px, cfg.margin, cfg.smoothing, window)
        return affines, affine_square(affines, px)
    cx, cy, side = smooth_track(boxes, cfg.smoothing, window)
    squares = crop_windows(cx, cy, side, cfg.margin)
    return box_affines(*squares, px), squares


def main_boxes(observations: list[KeyframeObs]) -> np.ndarray:
    return np.stack([o.main.box() for o in observations if o.main is not None])


@pytest.mark.parametrize("align", ["box", "landmarks"])
def test_single_pass_equals_the_whole_clip_computation(clips, detector, align):
    frames = clips["face_3"]
    cfg = FacesConfig(align=align, adaptive_detection=False)
    ref_obs, ref_track, ref_affines, ref_squares, ref_cuts, ref_scores = whole_clip(
        cfg, detector, frames
    )
    for chunk in (7, 32):  # chunking moves batch and emission boundaries, not results
        s, result, _ = stream(cfg, keyframes_for(cfg, detector, frames), frames, chunk)
        assert [o.frame for o in s.observations] == [o.frame for o in ref_obs]
        np.testing.assert_allclose(main_boxes(s.observations), main_boxes(ref_obs), atol=0.01)
        # the crops use exactly the whole-clip geometry of the stream's own detections
        track = result.track
        affines, squares = geometry(cfg, track.boxes, track.landmarks)
        np.testing.assert_allclose(result.affines, affines, rtol=1e-9, atol=1e-6)
        for got, want in zip((result.crop_x, result.crop_y, result.crop_size), squares):
            assert np.array_equal(got, want)
        # ... and the two-pass geometry to the pixel
        np.testing.assert_allclose(result.affines, ref_affines, rtol=1e-4, atol=0.05)
        for got, want in zip((result.crop_x, result.crop_y, result.crop_size), ref_squares):
            assert np.abs(got.astype(int) - want).max() <= 1
        assert list(track.source) == list(ref_track.source)
        assert np.array_equal(result.content_score, ref_scores)
        assert list(np.flatnonzero(result.shot_change)) == list(ref_cuts)


@pytest.mark.parametrize("name", ["face_3", "face_1"])
def test_adaptive_detection_finds_the_same_main_face(clips, detector, name):
    frames = clips[name]
    full_cfg, cfg = FacesConfig(adaptive_detection=False), FacesConfig()
    ref, ref_result, _ = stream(full_cfg, keyframes_for(full_cfg, detector, frames), frames, 16)
    keyframes = keyframes_for(cfg, detector, frames)
    calls = {"full": 0, "adaptive": 0}
    full, adaptive = keyframes.full, keyframes.adaptive_detect
    keyframes.full = lambda f: calls.__setitem__("full", calls["full"] + len(f)) or full(f)
    keyframes.adaptive_detect = lambda f, px, m: (
        calls.__setitem__("adaptive", calls["adaptive"] + len(f)) or adaptive(f, px, m)
    )
    s, result, _ = stream(cfg, keyframes, frames, 16)
    assert calls["full"] == 1 and calls["adaptive"] == len(s.observations) - 1
    assert [o.frame for o in s.observations] == [o.frame for o in ref.observations]
    for got, want in zip(s.observations, ref.observations, strict=True):
        assert got.main is not None and want.main is not None
        assert got.main.score >= 0.9 and got.num_faces == want.num_faces == 1
        side = want.main.size_px
        assert iou(got.main.box(), want.main.box()) > 0.8
        assert np.abs(got.main.box() - want.main.box()).mean() < 0.05 * side
        lm = np.subtract(got.main.landmarks, want.main.landmarks)
        assert np.abs(lm).max() < 0.08 * side
    # the smoothed crop windows agree to a few percent of their size (measured: centres
    # 1 % apart on average, 3 % at most; sizes within 5 %)
    size = ref_result.crop_size.astype(float)
    for got, want in ((result.crop_x, ref_result.crop_x), (result.crop_y, ref_result.crop_y)):
        shift = np.abs((got + result.crop_size / 2) - (want + size / 2)) / size
        assert shift.mean() < 0.02 and shift.max() < 0.05
    assert np.abs(result.crop_size / size - 1).max() < 0.08


def test_a_cut_resets_to_full_detection(clips, detector):
    a = clips["face_3"][:50]
    b = np.stack([cv2.resize(f, (590, 590), interpolation=cv2.INTER_AREA) for f in clips["face_1"]])
    frames = np.concatenate([a, b[:50]])
    cfg = FacesConfig()
    keyframes = keyframes_for(cfg, detector, frames)
    full_frames: list[int] = []
    full = keyframes.full

    def spy(batch: np.ndarray):
        for f in batch:
            full_frames.extend(i for i in range(len(frames)) if np.array_equal(f, frames[i]))
        return full(batch)

    keyframes.full = spy
    s, result, _ = stream(cfg, keyframes, frames, 16)
    assert list(np.flatnonzero(result.shot_change)) == [50]
    assert full_frames == [0, 50]  # the first keyframe, then the first one after the cut
    assert result.track.count("interpolated") == 0
    before, after = s.observations[9], s.observations[10]
    assert (before.frame, after.frame) == (45, 50)
    assert before.main is not None and after.main is not None
    assert iou(before.main.box(), after.main.box()) < 0.6  # the new shot's face, re-acquired


def buffer_bound(cfg: FacesConfig, chunk: int) -> int:
    """Frames the look-ahead can hold: a detection batch of keyframes not yet run, the cut
    look-ahead, a chunk, a gap and the smoothing half-window behind the last detection."""
    k = cfg.detect_every_k
    batch = cfg.resources.batch_size * k + 2 + chunk + k
    return batch + cfg.max_gap_frames + cfg.smoothing_window_frames // 2


def test_memory_stays_bounded_and_failures_match_the_whole_clip(detector):
    cfg = FacesConfig()
    bound = buffer_bound(cfg, chunk=16)
    steady = np.stack(moving_face_frames(3 * bound))
    _, result, largest = stream(cfg, keyframes_for(cfg, detector, steady), steady, 16)
    assert result.track.num_frames == len(steady) and largest <= bound

    def leaves(i: int) -> tuple[int, int]:  # steady, then slides out to the right for good
        return 85 + max(0, i - 20) * 12, 45

    for frames in (np.stack(moving_face_frames(2 * bound, path=leaves)), np.stack([canvas()] * 60)):
        with pytest.raises(ItemFailure) as whole:
            whole_clip(cfg, detector, frames)
        s, failure, largest = stream(cfg, keyframes_for(cfg, detector, frames), frames, 16)
        assert isinstance(failure, ItemFailure)
        assert (failure.kind, failure.message) == (whole.value.kind, whole.value.message)
        assert failure.kind in (FailureKind.FACE_LOST, FailureKind.NO_FACE)
        assert s.doomed and not s.buffer and largest <= bound
