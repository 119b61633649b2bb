"""Quality measures without media: yaw proxy and mouth region geometry."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.quality_audio import speech_stats
from tasks.quality_measures import LANDMARK_COLUMNS, Roi, mouth_roi, yaw_ratios

# left eye, right eye, nose, left mouth corner, right mouth corner (a frontal face)
FRONTAL = np.array([[40.0, 40.0, 80.0, 40.0, 60.0, 65.0, 45.0, 85.0, 75.0, 85.0]])


def rotate(lm: np.ndarray, deg: float, scale: float = 1.0) -> np.ndarray:
    t = np.deg2rad(deg)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * scale
    return (lm.reshape(-1, 5, 2) @ r.T).reshape(-1, 10)


def test_yaw_ratio_is_zero_frontal_and_invariant_to_roll_and_scale():
    assert yaw_ratios(FRONTAL)[0] == pytest.approx(0.0)
    turned = FRONTAL.copy()
    turned[0, 4] += 0.3 * 40  # nose 0.3 eye distances towards the right eye
    assert yaw_ratios(turned)[0] == pytest.approx(0.3)
    assert yaw_ratios(rotate(turned, 30, 2.5))[0] == pytest.approx(0.3)
    mirrored = turned.copy()
    mirrored[0, 4] = 2 * 60 - turned[0, 4]
    assert yaw_ratios(mirrored)[0] == pytest.approx(-0.3)


def boxes_for(lm: np.ndarray, crop_x: int, crop_y: int, crop_size: int) -> dict[str, np.ndarray]:
    n = lm.shape[0]
    cols = {c: lm[:, i] for i, c in enumerate(LANDMARK_COLUMNS)}
    k = 100 / crop_size  # crops shown at 100 px
    affine = {"m00": k, "m01": 0.0, "m02": -k * crop_x, "m10": 0.0, "m11": k, "m12": -k * crop_y}
    cols.update({c: np.full(n, v) for c, v in affine.items()})
    return cols


def test_mouth_roi_maps_landmarks_into_crop_pixels():
    # crop of 200 source px at (10, 0) shown at 100 px: mouth corners at (17.5, 42.5), (32.5, 42.5)
    lm = np.vstack([FRONTAL, np.full((1, 10), np.nan)])
    roi = mouth_roi(boxes_for(lm, 10, 0, 200), 100)
    width = 15.0
    assert roi == Roi(
        round(25 - 0.75 * width),
        round(42.5 - 0.5 * width),
        round(25 + 0.75 * width),
        round(42.5 + 0.6 * width),
    )
    # no landmarks at all: the lower middle of the crop
    fallback = mouth_roi(boxes_for(np.full((2, 10), np.nan), 0, 0, 100), 100)
    assert fallback == Roi(30, 55, 70, 80)


def test_speech_stats_share_and_snr():
    window, rate = 512, 16000
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, 20 * window)
    speech = noise.copy()
    speech[: 10 * window] += rng.normal(0, 0.1, 10 * window)  # first half 20 dB louder
    probs = np.r_[np.ones(10), np.zeros(10)]
    stats = speech_stats(probs, speech, window, rate)
    assert stats.speech_fraction == 0.5 and stats.speech_s == pytest.approx(10 * window / rate)
    assert stats.snr_db == pytest.approx(10 * np.log10(1.01e-2 / 1e-4), abs=0.5)
    # continuous speech: the quietest windows (5th percentile) stand in for the noise floor
    assert speech_stats(np.ones(20), speech, window, rate).snr_db > 10
    assert speech_stats(np.zeros(20), speech, window, rate).snr_db == 0.0
    assert speech_stats(np.zeros(0), speech[:0], window, rate).speech_fraction == 0.0


def _crop_video(tmp_path, name: str, face_px: int, kind: str, contrast: float = 1.0):
    """50 frames of the astronaut's face at ``face_px`` in the source, cut and upscaled to a
    256 px crop as the faces stage does: ``talk`` (mouth opening and closing), ``sway``
    (a still photo shifting by sub-pixel amounts, filmed: shifted at 4x, then sampled down)
    or ``frozen``. Returns (crops, roi, mouth width) in crop pixels."""
    import cv2

    from tasks.media import VideoWriter
    from tests.faces_helpers import astronaut_face

    crop = 256
    frames = []
    for i in range(50):
        face = astronaut_face(face_px, abs(np.sin(np.pi * i / 8)) if kind == "talk" else 0.0)
        if kind == "sway":
            big = astronaut_face(4 * face_px)
            dx, dy = 0.08 * face_px * np.sin(i / 5), 0.04 * face_px * np.cos(i / 7)
            shift = np.float32([[1, 0, dx], [0, 1, dy]])
            big = cv2.warpAffine(big, shift, big.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
            face = cv2.resize(big, (face_px, face_px), interpolation=cv2.INTER_AREA)
        face = np.clip(128 + (face.astype(np.float32) - 128) * contrast, 0, 255).astype(np.uint8)
        frames.append(cv2.resize(face, (crop, crop), interpolation=cv2.INTER_LINEAR))
    path = tmp_path / f"{name}.mp4"
    with VideoWriter(path, crop, crop, 25.0) as writer:
        writer.write(np.stack(frames))
    # astronaut_face's patch is 170 px of the photo; its mouth corners sit at (63, 107), (106, 110)
    k = crop / 170
    mx, my, width = 84.5 * k, 108.5 * k, 43.1 * k
    roi = Roi(
        round(mx - 0.75 * width), round(my - 0.5 * width), round(mx + 0.75 * width),
        round(my + 0.6 * width),
    )  # fmt: skip
    return path, roi, width


def test_lip_motion_ignores_face_size_and_contrast_and_separates_still_mouths(tmp_path):
    """The same talking face from 80 to 170 source pixels (upscaled 1.5-3.2x into the crop),
    and at half contrast, measures alike and above the threshold; swaying and frozen
    stills stay well below it. (Below ~64 px sampling noise lifts a swaying still towards
    the threshold: such faces fail ``face_size`` long before.)"""
    from tasks.quality_config import QualityConfig
    from tasks.quality_measures import scan_crops

    def lip(name: str, face_px: int, kind: str, contrast: float = 1.0) -> float:
        crops, roi, width = _crop_video(tmp_path, name, face_px, kind, contrast)
        return scan_crops(crops, 256, 50, 4, 0.6, roi, width).lip_motion

    threshold = QualityConfig().min_lip_motion
    talking = {px: lip(f"talk{px}", px, "talk") for px in (80, 120, 170)}
    assert min(talking.values()) > threshold
    assert max(talking.values()) / min(talking.values()) < 1.3, talking
    assert lip("dim", 120, "talk", contrast=0.5) == pytest.approx(talking[120], rel=0.15)
    for px in (80, 120, 170):
        assert lip(f"sway{px}", px, "sway") < threshold / 2
        assert lip(f"frozen{px}", px, "frozen") < threshold / 4
