"""Official framing of LivePortrait and EMOCA: the crop of a known box is the reference's,
and the dense-landmark box estimated from 5 points behaves (scale, rotation, real faces)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.transform import estimate_transform

from models import emoca, liveportrait
from tasks.features_framing import (
    CENTRE_DOWN,
    FRAMED_SIZES_PX,
    HEIGHT,
    SQUARE,
    WIDTH,
    cut_crops,
    framing_affines,
    landmark_box,
)


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:2, :2].T + m[:, 2]


def _liveportrait_reference(points: np.ndarray, dsize: int = 256) -> np.ndarray:
    """LivePortrait's crop of 68 landmarks, step by step as its ``crop.py`` describes it:
    axes from the eye centres (68-point indices 36-41 / 42-47, the two points of each eye
    it averages) to the lip corners' midpoint, the landmarks' box in those axes made square
    and scaled by 2.3, the centre moved by -0.125 sides along the eye→lip axis, then the
    rotation+scale that puts that square on ``dsize`` with the target centre at dsize/2."""
    eye_l = points[[36, 39]].mean(0)
    eye_r = points[[42, 45]].mean(0)
    lip = (points[48] + points[54]) / 2
    eye = (eye_l + eye_r) / 2
    uy = (lip - eye) / np.linalg.norm(lip - eye)
    ux = np.array([uy[1], -uy[0]])
    rot = np.stack([ux, uy])
    c0 = points.mean(0)
    r = (points - c0) @ rot.T
    lo, hi = r.min(0), r.max(0)
    size = (hi - lo).max() * 2.3
    centre = c0 + rot.T @ ((lo + hi) / 2) + uy * (-0.125 * size)
    angle = np.arccos(ux[0]) * (1 if ux[1] >= 0 else -1)
    c, s, k = np.cos(angle), np.sin(angle), dsize / size
    return np.array(
        [
            [k * c, k * s, dsize / 2 - k * (c * centre[0] + s * centre[1])],
            [-k * s, k * c, dsize / 2 - k * (-s * centre[0] + c * centre[1])],
        ]
    )


def _points68(rng: np.random.Generator, roll_deg: float) -> np.ndarray:
    """A 68-point-like set: jaw arc, brows, eyes, nose, lips, rolled and placed in a frame."""
    t = np.linspace(-1.2, 1.2, 17)
    jaw = np.stack([60 * np.sin(t), 70 * np.cos(t) - 10], 1)
    brows = np.stack([np.linspace(-45, 45, 10), np.full(10, -45.0)], 1)
    nose = np.stack([np.zeros(9), np.linspace(-25, 15, 9)], 1)
    eyes = np.concatenate(
        [np.stack([cx + 12 * np.cos(a), -28 + 5 * np.sin(a)], 1) for cx in (-25, 25)
         for a in [np.linspace(0, 2 * np.pi, 6, endpoint=False)]]
    )  # fmt: skip
    a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    lips = np.stack([22 * np.cos(a), 35 + 8 * np.sin(a)], 1)
    lips[[0, 6]] = lips[[10, 0]]  # indices 48 and 54 are the left and right lip corners
    pts = np.concatenate([jaw, brows, nose, eyes, lips]) + rng.normal(0, 1.5, (68, 2))
    a = np.deg2rad(roll_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return pts @ rot.T + np.array([320.0, 240.0])


@pytest.mark.parametrize("roll_deg", [0.0, 17.0, -30.0])
def test_liveportrait_crop_of_a_known_box_is_the_official_one(roll_deg):
    """The rule applied to the landmarks' box in the face's axes equals LivePortrait's crop
    of the landmarks themselves."""
    pts = _points68(np.random.default_rng(1), roll_deg)
    eye = (pts[[36, 39]].mean(0) + pts[[42, 45]].mean(0)) / 2
    uy = (pts[48] + pts[54]) / 2 - eye
    uy /= np.linalg.norm(uy)
    ux = np.array([uy[1], -uy[0]])
    r = pts @ np.stack([ux, uy]).T
    lo, hi = r.min(0), r.max(0)
    centre = np.stack([ux, uy]).T @ ((lo + hi) / 2)
    (w, h) = hi - lo
    ours = liveportrait.crop_affine(centre[None], ux[None], uy[None], np.array([w]), np.array([h]))
    np.testing.assert_allclose(ours[0], _liveportrait_reference(pts), atol=1e-9)
    # and in numbers: a 100 x 120 upright box at (300, 200): side 276, centre 34.5 px higher
    m = liveportrait.crop_affine(
        np.array([[300.0, 200.0]]), np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]),
        np.array([100.0]), np.array([120.0]),
    )[0]  # fmt: skip
    np.testing.assert_allclose(
        _apply(m, np.array([[300, 165.5], [162, 27.5]])), [[128, 128], [0, 0]], atol=1e-9
    )


def test_emoca_crop_of_a_known_box_is_deca_testdata_s():
    """bbox2point(kpt68) then scale 1.25: side int(1.375 × mean side), corners on pixel
    centres 0 and 223, the same similarity skimage estimates in DECA/EMOCA's TestData."""
    left, top, right, bottom = 100.0, 50.0, 200.0, 170.0
    m = emoca.crop_affine(*(np.array([v]) for v in (left, top, right, bottom)))[0]
    size = int((right - left + bottom - top) / 2 * 1.1 * 1.25)
    assert size == 151
    cx, cy = (left + right) / 2, (top + bottom) / 2
    src = np.array([[cx - size / 2, cy - size / 2], [cx - size / 2, cy + size / 2],
                    [cx + size / 2, cy - size / 2]])  # fmt: skip
    dst = np.array([[0, 0], [0, 223], [223, 0]])
    reference = estimate_transform("similarity", src, dst).params[:2]
    np.testing.assert_allclose(m, reference, atol=1e-9)
    np.testing.assert_allclose(
        _apply(m, np.array([[74.5, 34.5], [225.5, 185.5]])), [[0, 0], [223, 223]], atol=1e-9
    )


def _five(centre, eye_to_mouth, inter_ocular, roll_deg=0.0, nose_across=0.0) -> np.ndarray:
    """5 points (eyes, nose, mouth corners) of a face with the given geometry, as (1, 10)."""
    p = np.array(
        [[-inter_ocular / 2, 0], [inter_ocular / 2, 0], [nose_across, 0.5 * eye_to_mouth],
         [-0.4 * inter_ocular, eye_to_mouth], [0.4 * inter_ocular, eye_to_mouth]]
    )  # fmt: skip
    a = np.deg2rad(roll_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (p @ rot.T + centre).reshape(1, 10)


def test_landmark_box_follows_the_face_in_scale_roll_and_yaw():
    s = np.sqrt(40.0 * 36.0)
    box = landmark_box(_five((200.0, 150.0), 40.0, 36.0))
    np.testing.assert_allclose(box.scale, [s])
    np.testing.assert_allclose(box.centre[0], [200.0, 150.0 + CENTRE_DOWN * s])
    np.testing.assert_allclose(box.ux[0], [1.0, 0.0], atol=1e-12)
    # twice as large, rolled by 30°, elsewhere: the crops move with the face exactly
    moved = landmark_box(_five((500.0, 300.0), 80.0, 72.0, roll_deg=30.0))
    a = np.deg2rad(30.0)
    rot = 2 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    to_moved = np.concatenate([rot, (np.array([500.0, 300.0]) - rot @ [200.0, 150.0])[:, None]], 1)
    m0, m1 = box.liveportrait_affines()[0], moved.liveportrait_affines()[0]
    np.testing.assert_allclose(m1[:, :2] @ to_moved[:, :2], m0[:, :2], atol=1e-9)  # m1∘T = m0
    np.testing.assert_allclose(m1[:, :2] @ to_moved[:, 2] + m1[:, 2], m0[:, 2], atol=1e-9)
    # a head turned to its left (nose to image right): the outline's centre moves the other way
    turned = landmark_box(_five((200.0, 150.0), 40.0, 36.0, nose_across=5.0))
    assert turned.centre[0, 0] < 200.0
    # the crop sides: LivePortrait's square and EMOCA's mean side, in units of s
    side = 256 / np.hypot(*box.liveportrait_affines()[0, 0, :2])
    assert side == pytest.approx(2.3 * SQUARE * s)
    emoca_side = 223 / box.emoca_affines()[0, 0, 0]
    assert emoca_side == pytest.approx(np.floor(1.375 * (WIDTH + HEIGHT) / 2 * s))


def test_smoothing_steadies_a_jittering_track_and_fills_missing_frames():
    rng = np.random.default_rng(0)
    lm = np.concatenate([_five((200.0, 150.0), 40.0, 36.0) for _ in range(30)])
    lm += rng.normal(0, 1.0, lm.shape)
    lm[5:9] = np.nan  # not detected: interpolated
    raw, smooth = landmark_box(lm), landmark_box(lm, window_frames=9)
    assert np.isfinite(raw.centre).all()
    assert np.diff(smooth.centre, axis=0).std() < 0.5 * np.diff(raw.centre, axis=0).std()
    with pytest.raises(ValueError, match="no landmarks"):
        landmark_box(np.full((3, 10), np.nan))


def test_official_crops_of_a_real_face_frame_it_as_each_model_expects():
    """MTCNN's 5 points on the astronaut: LivePortrait's crop holds the detector's face box
    with room around it, EMOCA's is about the box's width (the box reaches higher, over the
    forehead, than the 68 landmarks EMOCA frames); the crops are cut."""
    from models.face_detector import load_detector

    img = data.astronaut()
    (face,) = load_detector("mtcnn", max_side_px=512, min_face_size_px=40).detect(img)[0]
    affines = framing_affines(
        np.ravel(face.landmarks)[None], ["vae_latents", *FRAMED_SIZES_PX], window_frames=1
    )
    assert set(affines) == set(FRAMED_SIZES_PX)
    corners = np.array([[face.x1, face.y1], [face.x2, face.y2]])
    for family, fraction in (("liveportrait_motion", (0.4, 0.65)), ("emoca_flame", (0.6, 0.9))):
        size = FRAMED_SIZES_PX[family]
        points = _apply(affines[family][0], np.array(face.landmarks))
        assert (points > 0.15 * size).all() and (points < 0.85 * size).all(), family
        box = _apply(affines[family][0], corners)
        share = (box[1, 0] - box[0, 0]) / size
        assert fraction[0] < share < fraction[1], (family, share)
        crop = cut_crops(img[None], affines[family], size)
        assert crop.shape == (1, size, size, 3) and crop.std() > 20
    assert (_apply(affines["liveportrait_motion"][0], corners) > 0).all()
