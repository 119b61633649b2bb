"""Face detectors: MTCNN with its shipped (real) weights, RetinaFace batched decoding.

RetinaFace weights are not available offline, so its tests use a seeded random network
whose first BatchNorm is calibrated on real frames under one input convention, as training
would leave it: batched decoding must reproduce the library's own single-image
``predict_jsons`` box for box, the weight loaders must round-trip a state dict file and
the hub legacy zip, and each checkpoint flavour must get its own preprocessing.
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

from models.face_detection import detector_model_spec, mtcnn_weights_dir
from models.face_detector import MtcnnDetector, RetinaFaceDetector, load_detector
from models.registry import ModelUnavailableError
from models.retinaface_weights import (
    FLAVOURS,
    RETINAFACE_HUB_FILE,
    RetinaFaceFlavourError,
    decide_flavour,
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


def fixture_frames() -> list[np.ndarray]:
    """The astronaut and the first frame of each real clip present, 256 px squares."""
    frames = [data.astronaut()]
    for path in real_clips():
        info = probe(path)
        frames.append(next(iter_frames(path, info.width, info.height, chunk=1))[0])
    return [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames]


def calibrated_state(model, flavour: str) -> dict[str, torch.Tensor]:
    """The network's state dict with ``body.bn1``'s running statistics measured on real
    frames normalised as ``flavour`` — what training on that input leaves behind."""
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = np.stack([FLAVOURS[flavour].normalise(f) for f in fixture_frames()])
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        state["body.conv1.weight"],
        stride=2,
        padding=3,
    )
    state["body.bn1.running_mean"] = y.mean(dim=(0, 2, 3))
    state["body.bn1.running_var"] = y.var(dim=(0, 2, 3))
    return state


@pytest.fixture(scope="module")
def random_retinaface():
    """A seeded random ResNet-50 RetinaFace (building one costs seconds: share it), its
    bn1 statistics those of retinaface-pytorch's RGB ImageNet-normalised input."""
    torch.manual_seed(0)
    weights = load_retinaface_model(None, max_size=64)
    assert not weights.pretrained and weights.flavour.name == "retinaface-pytorch"
    weights.model.load_state_dict(calibrated_state(weights.model, "retinaface-pytorch"))
    return weights.model


def test_retinaface_batched_decoding_equals_predict_jsons(random_retinaface):
    model = random_retinaface
    threshold = 0.5
    det = RetinaFaceDetector(model, None, confidence_threshold=threshold, pretrained=False)
    img = cv2.resize(data.astronaut(), (80, 60), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    frames = np.stack([img, img[:, ::-1], rng.integers(0, 255, img.shape, dtype=np.uint8)])
    batched = det.detect(frames)
    h, w = img.shape[:2]
    total, outside = 0, False
    for frame, dets in zip(frames, batched, strict=True):
        ref = [r for r in model.predict_jsons(frame, confidence_threshold=threshold) if r["bbox"]]
        assert len(dets) == len(ref)
        total += len(ref)
        if not ref:
            continue
        ref_boxes = np.array([r["bbox"] for r in ref])
        boxes = np.stack([d.box() for d in dets])
        # predict_jsons rounds to 2 decimals; same boxes (unclipped), same order
        np.testing.assert_allclose(boxes, ref_boxes, atol=0.006)
        outside |= bool((boxes[:, :2] < 0).any() or (boxes[:, 2] > w).any())
        outside |= bool((boxes[:, 3] > h).any())
        np.testing.assert_allclose([d.score for d in dets], [r["score"] for r in ref], atol=0.006)
        lms = np.array([np.ravel(d.landmarks) for d in dets])
        ref_lms = np.array([np.ravel(r["landmarks"]) for r in ref])
        np.testing.assert_allclose(lms, ref_lms, atol=0.006)
    assert total > 0  # a random net fires plenty of boxes at 0.5: the comparison is not empty
    assert outside  # and some cross the frame edge: they are compared unclipped


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


def test_each_checkpoint_flavour_is_recognised_or_refused_with_the_reason(
    random_retinaface, tmp_path
):
    """biubug6's DataParallel prefix, the hub zip, bn1's statistics, an explicit choice; a
    MobileNet file and an unmarked file fitting neither convention are refused."""
    net = random_retinaface.model
    for flavour in ("retinaface-pytorch", "biubug6"):
        state = calibrated_state(random_retinaface, flavour)
        found, why = decide_flavour(state, tmp_path / "plain.pth")
        assert found.name == flavour and why.startswith(f"body.bn1 statistics fit {flavour}")
    # DataParallel keys mark biubug6 whatever the statistics say
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    assert decide_flavour(prefixed, tmp_path / "Resnet50_Final.pth")[0].name == "biubug6"
    assert decide_flavour(net.state_dict(), tmp_path / "x.pth", "biubug6")[0].name == "biubug6"
    # freshly initialised BatchNorm statistics (mean 0, var 1) record no training input
    fresh = dict(net.state_dict())
    fresh["body.bn1.running_mean"] = torch.zeros(64)
    fresh["body.bn1.running_var"] = torch.ones(64)
    with pytest.raises(RetinaFaceFlavourError, match=r"faces\.retinaface_flavour"):
        decide_flavour(fresh, tmp_path / "fresh.pth")
    mobilenet = {"body.stage1.0.0.weight": torch.zeros(8, 3, 3, 3), "ClassHead.0.w": torch.zeros(1)}
    for choice in ("auto", "biubug6"):
        with pytest.raises(RetinaFaceFlavourError, match=r"MobileNet-0\.25"):
            decide_flavour(mobilenet, tmp_path / "mobilenet0.25_Final.pth", choice)
    # through the loader: the file as biubug6 ships it loads with its own preprocessing
    pth = tmp_path / "Resnet50_Final.pth"
    torch.save(prefixed, pth)
    det = load_detector("retinaface", pth, max_side_px=64)
    assert isinstance(det, RetinaFaceDetector) and det.flavour.name == "biubug6"
    torch.save(fresh, tmp_path / "fresh.pth")
    with pytest.raises(ModelUnavailableError, match="cannot tell which preprocessing"):
        load_detector("retinaface", tmp_path / "fresh.pth", max_side_px=64)
    det = load_detector("retinaface", tmp_path / "fresh.pth", retinaface_flavour="biubug6")
    assert det.flavour.name == "biubug6"


def test_both_flavours_normalise_a_fixture_frame_as_their_training_did(random_retinaface):
    """biubug6: ``detect.py``'s BGR float minus (104, 117, 123); the package: RGB with
    ImageNet mean/std; the detections follow each network input."""
    from retinaface.box_utils import decode
    from retinaface.prior_box import priorbox
    from torchvision.ops import nms

    frame = cv2.resize(fixture_frames()[-1], (64, 48), interpolation=cv2.INTER_AREA)
    ours = RetinaFaceDetector(random_retinaface, None, 0.5, pretrained=False)
    theirs = RetinaFaceDetector(
        random_retinaface, None, 0.5, pretrained=False, flavour=FLAVOURS["biubug6"]
    )
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR).astype(np.float32)
    np.testing.assert_array_equal(theirs.preprocess(frame), bgr - np.float32([104, 117, 123]))
    mean, std = np.float32([0.485, 0.456, 0.406]) * 255, np.float32([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(ours.preprocess(frame), (frame - mean) / std, atol=1e-5)
    assert random_retinaface.transform(image=frame)["image"].shape == frame.shape  # no resize

    # biubug6's detect.py on the same network, step by step
    x = torch.from_numpy((bgr - np.float32([104, 117, 123])).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        loc, conf, _ = random_retinaface.model(x)
    priors = priorbox([[16, 32], [64, 128], [256, 512]], [8, 16, 32], False, (48, 64))
    boxes = decode(loc[0], priors, [0.1, 0.2]) * torch.tensor([64, 48, 64, 48])
    scores = torch.softmax(conf[0], dim=-1)[:, 1]
    keep = scores > 0.5
    boxes, scores = boxes[keep], scores[keep]
    expected = boxes[nms(boxes, scores, 0.4)].numpy()
    # the package's drop rule, kept for every flavour, reduces to: x1 < W - 1 and y1 < H - 1
    expected = expected[(expected[:, 0] < 63) & (expected[:, 1] < 47)]
    found = theirs.detect(frame)[0]
    assert len(found) == len(expected) > 0
    np.testing.assert_allclose(np.stack([d.box() for d in found]), expected, atol=1e-3)
    assert [d.box().tolist() for d in ours.detect(frame)[0]] != [d.box().tolist() for d in found]


def test_unknown_detector_and_missing_weights(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown face detector"):
        load_detector("haar")
    with pytest.raises(ModelUnavailableError):
        load_detector("retinaface", tmp_path / "missing.pth")


def test_faces_stage_runs_retinaface_from_a_data_root_path(random_retinaface, tmp_path):
    """Wiring only (random weights find no real faces): path, fingerprint label, typed result."""
    from tasks.base import FailureKind, ItemFailure
    from tasks.faces import FacesStage
    from tasks.faces_config import FacesConfig
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
