"""Face detectors: MTCNN with its shipped (real) weights, RetinaFace batched decoding.

RetinaFace weights are not available offline, so its tests use a seeded random network:
batched decoding must reproduce the library's own single-image ``predict_jsons`` box for
box, and the weight loaders must round-trip a state dict file and the hub legacy zip.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from models.face_detector import (
    MtcnnDetector,
    RetinaFaceDetector,
    detector_model_spec,
    load_detector,
    mtcnn_weights_dir,
)
from models.registry import ModelUnavailableError
from models.retinaface_weights import (
    RETINAFACE_HUB_FILE,
    load_retinaface_model,
    load_retinaface_state_dict,
    resolve_retinaface_weights,
)
from tasks.media import iter_frames, probe
from tests.faces_helpers import real_clips

# The astronaut's face in skimage's 512 px photo (measured once with MTCNN; eyes above nose).
ASTRONAUT_BOX = np.array([181.0, 62.0, 268.0, 172.0])


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    det = load_detector("mtcnn", max_side_px=512, min_face_size_px=40, num_threads=1)
    assert isinstance(det, MtcnnDetector)
    return det


def test_mtcnn_finds_the_astronaut_face_with_landmarks(mtcnn):
    img = data.astronaut()
    blank = np.full_like(img, 127)
    found, empty = mtcnn.detect(np.stack([img, blank]))
    assert empty == []
    assert len(found) == 1
    d = found[0]
    assert d.score > 0.99
    assert np.abs(d.box() - ASTRONAUT_BOX).max() < 12
    (lex, ley), (rex, rey), (_nx, ny), (mlx, mly), (mrx, mry) = d.landmarks
    for x, y in d.landmarks:
        assert d.x1 <= x <= d.x2 and d.y1 <= y <= d.y2
    assert lex < rex and mlx < mrx  # left/right in image coordinates
    assert max(ley, rey) < ny < min(mly, mry)  # eyes above nose above mouth


def test_mtcnn_batched_matches_single_and_downscale_maps_back(mtcnn):
    img = data.astronaut()
    flipped = np.ascontiguousarray(img[:, ::-1])
    batched = mtcnn.detect(np.stack([img, flipped]))
    singles = [mtcnn.detect(img)[0], mtcnn.detect(flipped[None])[0]]
    for b, s in zip(batched, singles, strict=True):
        assert len(b) == len(s) == 1
        assert np.abs(b[0].box() - s[0].box()).max() < 1.0
    # the mirrored face mirrors the box (MTCNN is not mirror-symmetric: candidate windows
    # start at whole pixels, so the mirrored box lands 1-4.3 px off, by resampler)
    assert batched[1][0].x1 == pytest.approx(512 - batched[0][0].x2, abs=5)
    # a 2x frame is detected at <= 512 px and mapped back to its own pixels
    big = cv2.resize(img, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    (d,) = mtcnn.detect(big[None])[0]
    assert np.abs(d.box() / 2 - batched[0][0].box()).max() < 8


def test_detector_rejects_bad_frames(mtcnn):
    with pytest.raises(ValueError):
        mtcnn.detect(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError):
        mtcnn.detect(np.zeros((1, 32, 32, 3), np.float32))
    assert mtcnn.detect(np.zeros((0, 32, 32, 3), np.uint8)) == []


def test_mtcnn_fingerprint_hashes_the_shipped_weights(mtcnn):
    weights = sorted(mtcnn_weights_dir().glob("*.pt"))
    assert [p.name for p in weights] == ["onet.pt", "pnet.pt", "rnet.pt"]
    h = hashlib.sha256()
    for p in weights:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).hexdigest().encode())
    fp = mtcnn.fingerprint()
    assert fp.sha256 == h.hexdigest() and fp.origin == "pretrained" and fp.name == "mtcnn"
    assert detector_model_spec("mtcnn", None) == mtcnn.model_spec()


@pytest.fixture(scope="module")
def random_retinaface():
    """A seeded random ResNet-50 RetinaFace (building one costs seconds: share it)."""
    torch.manual_seed(0)
    model, pretrained = load_retinaface_model(None, max_size=64)
    assert not pretrained
    return model


def test_retinaface_batched_decoding_equals_predict_jsons(random_retinaface):
    model = random_retinaface
    threshold = 0.5
    det = RetinaFaceDetector(model, None, confidence_threshold=threshold, pretrained=False)
    img = cv2.resize(data.astronaut(), (80, 60), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    frames = np.stack([img, img[:, ::-1], rng.integers(0, 255, img.shape, dtype=np.uint8)])
    batched = det.detect(frames)
    h, w = img.shape[:2]
    total = 0
    for frame, dets in zip(frames, batched, strict=True):
        ref = [r for r in model.predict_jsons(frame, confidence_threshold=threshold) if r["bbox"]]
        assert len(dets) == len(ref)
        total += len(ref)
        if not ref:
            continue
        ref_boxes = np.array([r["bbox"] for r in ref])
        ref_boxes[:, [0, 2]] = ref_boxes[:, [0, 2]].clip(0, w)
        ref_boxes[:, [1, 3]] = ref_boxes[:, [1, 3]].clip(0, h)
        boxes = np.stack([d.box() for d in dets])
        # predict_jsons rounds to 2 decimals; same boxes, same order
        np.testing.assert_allclose(boxes, ref_boxes, atol=0.006)
        np.testing.assert_allclose([d.score for d in dets], [r["score"] for r in ref], atol=0.006)
        lms = np.array([np.ravel(d.landmarks) for d in dets])
        ref_lms = np.array([np.ravel(r["landmarks"]) for r in ref])
        np.testing.assert_allclose(lms, ref_lms, atol=0.006)
    assert total > 0  # a random net fires plenty of boxes at 0.5: the comparison is not empty


def test_retinaface_loads_state_dict_and_hub_zip(random_retinaface, tmp_path, monkeypatch):
    state = random_retinaface.model.state_dict()
    pth = tmp_path / "retinaface.pth"
    torch.save(state, pth)
    det = load_detector("retinaface", pth, max_side_px=64)
    assert isinstance(det, RetinaFaceDetector) and det.pretrained
    key = "body.conv1.weight"
    assert torch.equal(det.model.model.state_dict()[key], state[key])
    assert len(det.detect(np.zeros((2, 48, 64, 3), np.uint8))) == 2
    fp = det.fingerprint()
    assert (
        fp.sha256
        == hashlib.sha256(
            b"retinaface.pth" + hashlib.sha256(pth.read_bytes()).hexdigest().encode()
        ).hexdigest()
    )
    assert detector_model_spec("retinaface", str(pth)).source == str(pth)

    # torch hub cache: the official file name, a legacy one-member zip, found via TORCH_HOME
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelUnavailableError, match=RETINAFACE_HUB_FILE):
        load_detector("retinaface", None)
    hub = tmp_path / "torch" / "hub" / "checkpoints" / RETINAFACE_HUB_FILE
    hub.parent.mkdir(parents=True)
    with zipfile.ZipFile(hub, "w", zipfile.ZIP_STORED) as zf:
        zf.write(pth, "retinaface_resnet50_2020-07-20.pth")
    assert resolve_retinaface_weights(None) == hub
    loaded = load_retinaface_state_dict(hub)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert detector_model_spec("retinaface", None).source == str(hub)


def test_unknown_detector_and_missing_weights(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown face detector"):
        load_detector("haar")
    with pytest.raises(ModelUnavailableError):
        load_detector("retinaface", tmp_path / "missing.pth")


def test_faces_stage_runs_retinaface_from_a_data_root_path(random_retinaface, tmp_path):
    """Wiring only (random weights find no real faces): path, fingerprint label, typed result."""
    from tasks.base import FailureKind, ItemFailure
    from tasks.faces import FacesConfig, FacesStage
    from tests.faces_helpers import (
        inputs_for,
        make_ctx,
        make_env,
        moving_face_frames,
        normalized_from_frames,
    )

    weights = tmp_path / "weights" / "retinaface.pth"
    weights.parent.mkdir()
    torch.save(random_retinaface.model.state_dict(), weights)
    cfg = FacesConfig(
        detector="retinaface",
        retinaface_weights="weights/retinaface.pth",
        detect_max_side_px=64,
        crop_size_px=64,
    )
    stage = FacesStage(cfg, make_env(tmp_path))
    assert stage.model_specs()[0].source == str(weights)
    stage.setup()
    sha = hashlib.sha256(
        b"retinaface.pth" + hashlib.sha256(weights.read_bytes()).hexdigest().encode()
    ).hexdigest()
    assert stage.detector_label == f"retinaface@{sha[:12]}"
    clip = normalized_from_frames(tmp_path, "rf", moving_face_frames(10))
    try:
        rec = stage.process(inputs_for("rf", download=clip), make_ctx(tmp_path, "faces", "rf"))
    except ItemFailure as e:
        assert e.kind in (FailureKind.NO_FACE, FailureKind.FACE_LOST)
    else:
        assert rec.num_frames == 10 and rec.detector == stage.detector_label


def test_mtcnn_cascade_agrees_with_facenet_pytorch(mtcnn):
    """Our cascade against the library's ``MTCNN.detect`` on the astronaut and real frames:
    the same faces, boxes and landmarks within a few percent of the face, close scores;
    with ``group_iou=0.3`` (one O-net box per face) the same faces still."""
    from facenet_pytorch import MTCNN

    frames = [data.astronaut()]
    for path in real_clips()[:3]:
        info = probe(path)
        first = next(iter_frames(path, info.width, info.height, chunk=1))[0]
        frames.append(cv2.resize(first, (512, 512), interpolation=cv2.INTER_AREA))
    library = MTCNN(keep_all=True, min_face_size=40)
    for frame in frames:
        boxes, probs, points = library.detect(frame, landmarks=True)
        for group_iou in (None, 0.3):
            found = [d for d in mtcnn.detect(frame, group_iou=group_iou)[0] if d.score > 0.9]
            assert len(found) == int((probs > 0.9).sum()) == 1
            (d,) = found
            side = d.size_px
            assert np.abs(d.box() - boxes[0]).max() < 0.1 * side
            assert np.abs(np.asarray(d.landmarks) - points[0]).max() < 0.06 * side
            if group_iou is None:
                assert d.score == pytest.approx(float(probs[0]), abs=0.01)


def test_search_settings_are_per_call_and_mtcnn_only(mtcnn, random_retinaface):
    img = data.astronaut()
    (face,) = mtcnn.detect(img)[0]
    assert mtcnn.detect(img, min_face_px=400)[0] == []  # the ~100 px face is not searched
    assert mtcnn.detect(img)[0][0] == face  # the configured search is back
    small = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    (d,) = mtcnn.detect(small, min_face_px=12)[0]
    assert np.abs(d.scaled(4).box() - face.box()).max() < 0.1 * face.size_px
    assert d.scaled(4).landmarks[0] == (d.landmarks[0][0] * 4, d.landmarks[0][1] * 4)
    retinaface = RetinaFaceDetector(random_retinaface, None, pretrained=False)
    with pytest.raises(ValueError, match="no search settings"):
        retinaface.detect(img, min_face_px=20)
