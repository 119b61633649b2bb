"""The face detectors' light side, for planning and for code that only handles detections:
:class:`Detection` (one face found), :func:`iou`, and the registry spec of a detector's
weights (:func:`detector_model_spec`). The networks themselves live in
:mod:`models.face_detector`, which imports torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.registry import ModelSpec

DETECTOR_NAMES = ("mtcnn", "retinaface")


@dataclass(frozen=True, slots=True)
class Detection:
    """One face: box corners in pixels of the input frame, detector score, 5 landmarks."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: tuple[tuple[float, float], ...]  # 5 (x, y) points, or () when unavailable

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def size_px(self) -> float:
        """The face's side: ``max(width, height)``, the quantity crops and size rules use."""
        return max(self.width, self.height)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def box(self) -> np.ndarray:
        return np.array([self.x1, self.y1, self.x2, self.y2], dtype=np.float64)

    def scaled(self, factor: float) -> Detection:
        """The same detection in pixels of a frame ``factor`` times larger."""
        x1, y1, x2, y2 = (v * factor for v in (self.x1, self.y1, self.x2, self.y2))
        points = tuple((x * factor, y * factor) for x, y in self.landmarks)
        return Detection(x1, y1, x2, y2, self.score, points)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``x1, y1, x2, y2`` boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mtcnn_weights_dir() -> Path:
    """The ``data/`` folder of the installed facenet-pytorch (pnet/rnet/onet ``.pt``), found
    without importing the package (which imports torch)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'facenet_pytorch'", name="facenet_pytorch")
    return Path(spec.origin).resolve().parent / "data"


def detector_model_spec(name: str, weights_path: str | None) -> ModelSpec:
    """The registry spec for a detector's weights, without loading the network."""
    if name == "mtcnn":
        return ModelSpec(family="mtcnn", source=str(mtcnn_weights_dir()))
    if name == "retinaface":  # a missing file fails in ensure_model, with the fix to apply
        if weights_path:
            path = Path(weights_path).expanduser()
        else:
            from models.retinaface_weights import retinaface_hub_path  # torch hub's folder

            path = retinaface_hub_path()
        return ModelSpec(family="retinaface", source=str(path))
    raise ValueError(f"unknown face detector {name!r}; choose one of {DETECTOR_NAMES}")
