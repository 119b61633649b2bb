"""Batched face detection behind one interface: MTCNN (facenet-pytorch) and RetinaFace.

``FaceDetector.detect(frames)`` takes ``(N, H, W, 3)`` uint8 RGB frames of one size and
returns, per frame, the faces found as :class:`Detection` (pixel box, score, 5 landmarks in
the order left eye, right eye, nose, left mouth corner, right mouth corner), sorted by
score, highest first.

Backends:

- ``mtcnn``: facenet-pytorch's MTCNN P/R/O-nets with the weights that ship in the wheel
  (real, offline), run by :func:`models.mtcnn_cascade.detect_faces` (the library's cascade
  with OpenCV-resampled candidate crops). Frames are downscaled to
  ``max_side_px`` before detection (the image pyramid cost grows with resolution;
  talking-head faces are large) and boxes scaled back. ``detect(..., min_face_px=...,
  group_iou=...)`` changes the smallest face searched and how many O-net candidates each
  face gets, for one call (``tunable``).
- ``retinaface``: ``retinaface-pytorch`` 0.0.8's ResNet-50 ``Model``. Its only API,
  ``predict_jsons``, handles one image; here the network runs on the whole batch and each
  image is decoded as ``predict_jsons`` does (same resize, priors, decode, threshold, NMS
  and drop rule), so with the package's own weights results match it box for box: boxes
  and landmarks are *not* clipped to the frame (``predict_jsons`` clips only to decide
  which boxes to drop), like MTCNN's, so a face cut by the frame edge keeps its true
  size and centre and crops pad outside the frame. Only the 2-decimal rounding of
  ``predict_jsons`` is left out. Weights load through :mod:`models.retinaface_weights`,
  which decides their flavour: biubug6's ``Resnet50_Final.pth`` gets its own BGR
  mean-subtracted input instead of the package's RGB ImageNet normalisation; nothing is
  downloaded.

Weights are fingerprinted (sha256 over the weight files) through :mod:`models.registry`
model specs, so artifacts record which detector made them.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.face_detection import DETECTOR_NAMES, Detection, mtcnn_weights_dir
from models.fingerprint import ModelFingerprint
from models.mtcnn_cascade import LIBRARY_GROUP_IOU, detect_faces
from models.registry import ModelSpec, ModelUnavailableError
from models.retinaface_weights import (
    FLAVOURS,
    Flavour,
    FlavourChoice,
    load_retinaface_model,
    resolve_retinaface_weights,
)
from storage.store import sha256_file


class FaceDetector(ABC):
    """A batched face detector. Subclasses set ``name`` and implement :meth:`_detect`."""

    name: str
    pretrained: bool = True  # False only for randomly initialised test networks
    # torch intra-op threads during detection (None: leave torch's setting). MTCNN runs many
    # tiny per-box ops whose thread overhead dominates: 1 thread is ~6x faster on a busy
    # 2-core machine. The stage passes its reserved ``num_cpus``.
    num_threads: int | None = None
    # whether detect() takes ``min_face_px`` and ``group_iou`` (MTCNN's cascade)
    tunable: bool = False

    def detect(
        self,
        frames: np.ndarray | Sequence[np.ndarray],
        *,
        min_face_px: float | None = None,
        group_iou: float | None = None,
    ) -> list[list[Detection]]:
        """Detect faces in ``(N, H, W, 3)`` uint8 RGB frames (all the same size).

        For this call only, on ``tunable`` detectors: ``min_face_px``, the smallest face
        searched, in detection pixels (after any downscale), instead of the configured one;
        ``group_iou``, the IoU above which a face's R-net survivors are merged before O-net
        (:mod:`models.mtcnn_cascade`; default 0.7, the library's).
        """
        if (min_face_px is not None or group_iou is not None) and not self.tunable:
            raise ValueError(f"{self.name} has no search settings to change")
        batch = np.asarray(frames)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {batch.shape} {batch.dtype}")
        if batch.shape[0] == 0:
            return []
        with _torch_threads(self.num_threads):
            out = self._detect(np.ascontiguousarray(batch), min_face_px, group_iou)
        return [sorted(dets, key=lambda d: -d.score) for dets in out]

    @abstractmethod
    def _detect(
        self, frames: np.ndarray, min_face_px: float | None, group_iou: float | None
    ) -> list[list[Detection]]: ...

    @abstractmethod
    def model_spec(self) -> ModelSpec:
        """The weights this detector loads, as a registry spec (for fingerprinting)."""

    def fingerprint(self) -> ModelFingerprint:
        """sha256 over the weight files; computed here without writing any cache file."""
        spec = self.model_spec()
        path = Path(spec.source)
        files = [path] if path.is_file() else sorted(path.glob("*.pt"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return ModelFingerprint(
            name=spec.family,
            source=spec.source,
            resolved_path=str(path),
            sha256=h.hexdigest(),
            origin="pretrained" if self.pretrained else "random-init",
        )


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide; restored after)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _downscale(frames: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    """Resize so the long side is at most ``max_side_px``; returns (frames, scale to source)."""
    h, w = frames.shape[1:3]
    long_side = max(h, w)
    if long_side <= max_side_px:
        return frames, 1.0
    s = max_side_px / long_side
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
    return small, w / size[0]


class MtcnnDetector(FaceDetector):
    """facenet-pytorch's MTCNN nets with their shipped weights, batched over frames.

    ``min_face_size_px`` is in detection-resolution pixels (after the downscale to
    ``max_side_px``); smaller values add pyramid levels and cost.
    """

    name = "mtcnn"
    tunable = True

    def __init__(
        self,
        device: str = "cpu",
        max_side_px: int = 640,
        min_face_size_px: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    ):
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.device = device
        self.max_side_px = max_side_px
        self.min_face_size_px = min_face_size_px
        self.thresholds = thresholds
        # channels-last convolutions and pooling run R-net/O-net about twice as fast on CPU
        self.nets = (
            PNet().to(device).eval(),
            RNet().to(device, memory_format=torch.channels_last).eval(),
            ONet().to(device, memory_format=torch.channels_last).eval(),
        )

    def model_spec(self) -> ModelSpec:
        return ModelSpec(family="mtcnn", source=str(mtcnn_weights_dir()))

    def _detect(
        self, frames: np.ndarray, min_face_px: float | None, group_iou: float | None
    ) -> list[list[Detection]]:
        small, scale = _downscale(frames, self.max_side_px)
        min_face = self.min_face_size_px if min_face_px is None else min_face_px
        group = LIBRARY_GROUP_IOU if group_iou is None else group_iou
        with torch.inference_mode():
            found = detect_faces(small, self.nets, min_face, self.thresholds, group)
        out: list[list[Detection]] = []
        for boxes, points in found:
            b = boxes.astype(np.float64)
            lm = points.astype(np.float64) * scale
            out.append(
                [
                    Detection(*map(float, b[i, :4] * scale), float(b[i, 4]), _points(lm[i]))
                    for i in range(b.shape[0])
                ]
            )
        return out


def _points(lm: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in lm.reshape(5, 2))


class RetinaFaceDetector(FaceDetector):
    """retinaface-pytorch's ResNet-50 RetinaFace, batched on the network.

    ``model`` is a ``retinaface.predict_single.Model`` with weights loaded (see
    :func:`load_retinaface_model`); ``max_size`` of that model sets the detection
    resolution (the long side after ``LongestMaxSize``). ``flavour`` is the input
    normalisation the weights were trained with (default: the package's own).
    """

    name = "retinaface"

    def __init__(
        self,
        model: Any,
        weights_path: Path | None,
        confidence_threshold: float = 0.7,
        nms_threshold: float = 0.4,
        pretrained: bool = True,
        flavour: Flavour = FLAVOURS["retinaface-pytorch"],
    ):
        self.model = model
        self.model.eval()
        self.flavour = flavour
        self.weights_path = weights_path
        self.confidence_threshold = confidence_threshold
        self.nms_threshold = nms_threshold
        self.pretrained = pretrained
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    def model_spec(self) -> ModelSpec:
        if self.weights_path is None:
            raise ModelUnavailableError("RetinaFace built in memory has no weights file")
        return ModelSpec(family="retinaface", source=str(self.weights_path))

    def _priors_for(self, hw: tuple[int, int]) -> torch.Tensor:
        from retinaface.prior_box import priorbox

        if hw not in self._priors:
            self._priors[hw] = priorbox(
                min_sizes=[[16, 32], [64, 128], [256, 512]],
                steps=[8, 16, 32],
                clip=False,
                image_size=hw,
            ).to(self.model.device)
        return self._priors[hw]

    def _detect(
        self, frames: np.ndarray, min_face_px: float | None, group_iou: float | None
    ) -> list[list[Detection]]:
        from retinaface.box_utils import decode, decode_landm
        from torchvision.ops import nms

        m = self.model
        orig_h, orig_w = frames.shape[1:3]
        prepped = np.stack([self.preprocess(f) for f in frames])
        th, tw = prepped.shape[1:3]
        x = torch.from_numpy(np.ascontiguousarray(prepped.transpose(0, 3, 1, 2))).to(m.device)
        priors = self._priors_for((th, tw))
        scale_boxes = torch.tensor([tw, th, tw, th], device=m.device)
        scale_landms = torch.tensor([tw, th] * 5, device=m.device)
        resize_coeff = orig_h / th
        with torch.inference_mode():
            loc, conf, landm = m.model(x)
            conf = torch.softmax(conf, dim=-1)
        out: list[list[Detection]] = []
        for i in range(frames.shape[0]):
            boxes = decode(loc[i], priors, m.variance) * scale_boxes
            lms = decode_landm(landm[i], priors, m.variance) * scale_landms
            scores = conf[i][:, 1]
            keep = torch.where(scores > self.confidence_threshold)[0]
            boxes, lms, scores = boxes[keep], lms[keep], scores[keep]
            keep = nms(boxes, scores, self.nms_threshold)
            b = boxes[keep].cpu().numpy().astype(np.float64) * resize_coeff
            lm = lms[keep].cpu().numpy().astype(np.float64).reshape(-1, 10) * resize_coeff
            s = scores[keep].cpu().numpy().astype(np.float64)
            out.append(
                [
                    Detection(*map(float, b[j]), float(s[j]), _points(lm[j]))
                    for j in range(b.shape[0])
                    # predict_jsons' drop rule for boxes outside the image
                    if _valid_span(b[j, 0], b[j, 2], orig_w)
                    and _valid_span(b[j, 1], b[j, 3], orig_h)
                ]
            )
        return out

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """One RGB uint8 frame → the float32 HWC network input its weights expect.

        The package's resize (``LongestMaxSize``) either way; then its own ``Normalize``
        (exactly ``predict_jsons``'s transform) or the weights' flavour's normalisation.
        """
        if self.flavour.name == "retinaface-pytorch":
            return self.model.transform(image=frame)["image"]
        resize = self.model.transform.transforms[0]  # LongestMaxSize
        return self.flavour.normalise(resize(image=frame)["image"])


def _valid_span(lo: float, hi: float, size: int) -> bool:
    lo_c = float(np.clip(lo, 0, size - 1))
    hi_c = float(np.clip(hi, lo_c + 1, size - 1))
    return lo_c < hi_c


def load_detector(
    name: str,
    weights_path: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    *,
    max_side_px: int = 640,
    min_face_size_px: int = 20,
    confidence_threshold: float = 0.7,
    num_threads: int | None = None,
    retinaface_flavour: FlavourChoice = "auto",
) -> FaceDetector:
    """Build a detector by name: ``mtcnn`` (shipped weights) or ``retinaface``.

    RetinaFace weights: ``weights_path`` (a state-dict file or the hub zip), else the torch
    hub cache file; missing weights raise :class:`ModelUnavailableError`, and so do weights
    whose preprocessing cannot be decided (``retinaface_flavour``; see
    :func:`models.retinaface_weights.decide_flavour`).
    """
    detector: FaceDetector
    if name == "mtcnn":
        detector = MtcnnDetector(
            device=device, max_side_px=max_side_px, min_face_size_px=min_face_size_px
        )
    elif name == "retinaface":
        path = resolve_retinaface_weights(weights_path)
        weights = load_retinaface_model(path, device, max_side_px, retinaface_flavour)
        detector = RetinaFaceDetector(
            weights.model,
            path,
            confidence_threshold=confidence_threshold,
            pretrained=weights.pretrained,
            flavour=weights.flavour,
        )
    else:
        raise ValueError(f"unknown face detector {name!r}; choose one of {DETECTOR_NAMES}")
    detector.num_threads = num_threads
    return detector
