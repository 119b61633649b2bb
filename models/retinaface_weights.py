"""Where RetinaFace's weights come from, which preprocessing they expect, and how they load.

``retinaface-pytorch``'s ResNet-50 weights are a local state-dict file or the torch hub cache
file :data:`RETINAFACE_HUB_FILE` (a legacy one-member zip), always read through
``torch.load(weights_only=True)``; nothing is downloaded. :class:`models.face_detector.
RetinaFaceDetector` runs them.

**Two checkpoint flavours share one state-dict layout but not one input** (:data:`FLAVOURS`):

- ``retinaface-pytorch`` (ternaus, the package's own ``resnet50_2020-07-20``): RGB,
  ``albumentations.Normalize()`` = ImageNet mean/std on [0, 255];
- ``biubug6`` (Pytorch_Retinaface's ``Resnet50_Final.pth``, which the package's network
  copies key for key): BGR float minus (104, 117, 123), no scaling — its ``detect.py``.

Fed the wrong one, the network still returns boxes, just wrong ones, so the flavour is
decided when the weights load (:func:`decide_flavour`), in this order:

1. a MobileNet-0.25 checkpoint (biubug6's ``mobilenet0.25_Final.pth``: ``body.stage1``…
   keys) is refused: the package builds only the ResNet-50 network;
2. ``faces.retinaface_flavour`` when it names one (the operator knows the file);
3. keys prefixed ``module.`` (DataParallel): how biubug6 ships ``Resnet50_Final.pth``;
4. the torch-hub legacy zip: how retinaface-pytorch ships its weights;
5. otherwise the network's own first BatchNorm: ``body.bn1``'s running statistics record
   the conv1 responses the network saw in training, and the two input conventions differ
   by a factor ≈ 58² in their variance. :func:`input_scale_mismatch` compares the recorded
   second moments with conv1's responses to a fixed synthetic 1/f image under each
   convention; the flavour that fits within :data:`PROBE_MARGIN_NATS` better than the
   other wins, and a checkpoint that fits neither clearly is refused with both figures.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.registry import ModelUnavailableError

RETINAFACE_HUB_FILE = "retinaface_resnet50_2020-07-20-f168fae3c.zip"
FlavourName = Literal["retinaface-pytorch", "biubug6"]
FlavourChoice = Literal["auto", "retinaface-pytorch", "biubug6"]
# the probe's winner must fit this much better (log of the second-moment ratio, median
# over channels) than the other convention; the two conventions are ≈ 8.1 nats apart
PROBE_MARGIN_NATS = math.log(16.0)
_MOBILENET_MARK = "body.stage1."


@dataclass(frozen=True)
class Flavour:
    """One training preprocessing: channel order fed, then ``(x - mean) / std`` on [0, 255]."""

    name: FlavourName
    channels: Literal["RGB", "BGR"]
    mean: tuple[float, float, float]  # in the order fed
    std: tuple[float, float, float]

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """``(..., 3)`` uint8 RGB → float32 network input, channels last."""
        x = rgb[..., ::-1] if self.channels == "BGR" else rgb
        mean = np.asarray(self.mean, np.float32)
        return (x.astype(np.float32) - mean) / np.asarray(self.std, np.float32)


FLAVOURS: dict[str, Flavour] = {
    "retinaface-pytorch": Flavour(
        "retinaface-pytorch",
        "RGB",
        (0.485 * 255, 0.456 * 255, 0.406 * 255),
        (0.229 * 255, 0.224 * 255, 0.225 * 255),
    ),
    "biubug6": Flavour("biubug6", "BGR", (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)),
}


class RetinaFaceFlavourError(ModelUnavailableError):
    """The weights' training preprocessing is unknown or unsupported; the message says why."""


@dataclass(frozen=True)
class RetinaFaceWeights:
    """A loaded ``retinaface.predict_single.Model`` and the preprocessing its weights need."""

    model: Any
    pretrained: bool  # False: random initialisation (tests only)
    flavour: Flavour
    decided_by: str  # how the flavour was decided, for logs and error messages


def retinaface_hub_path() -> Path:
    """Where torch hub caches the official weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RETINAFACE_HUB_FILE


def resolve_retinaface_weights(weights_path: str | os.PathLike[str] | None) -> Path:
    """The local weights file for RetinaFace; a missing file raises ModelUnavailableError."""
    path = Path(weights_path).expanduser() if weights_path else retinaface_hub_path()
    if not path.is_file():
        raise ModelUnavailableError(
            f"RetinaFace weights not found at {path}; put the official "
            f"{RETINAFACE_HUB_FILE} (or its state dict) there or set retinaface_weights"
        )
    return path


def _hub_zip_member(path: Path) -> bytes | None:
    """The one member of a torch-hub legacy zip, else None (torch.save's own zip has many)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        return zf.read(members[0]) if len(members) == 1 else None


def load_retinaface_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict file or the torch hub legacy zip (one member), weights only."""
    blob = _hub_zip_member(path)
    source: Any = io.BytesIO(blob) if blob is not None else path
    return torch.load(source, map_location="cpu", weights_only=True)


def probe_image(size_px: int = 128, seed: int = 0) -> np.ndarray:
    """A fixed RGB uint8 image with natural-image statistics (1/f spectrum, pixel mean and
    spread of photos, strongly correlated channels): the probe's stand-in for a photo."""
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size_px), np.fft.fftfreq(size_px)))
    f[0, 0] = 1.0
    planes = []
    for _ in range(2):  # luminance, then a weaker chroma component
        noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size_px, size_px))) / f).real
        planes.append((noise - noise.mean()) / noise.std())
    lum, chroma = planes
    mean_rgb = np.array([123.7, 116.3, 103.5])  # ImageNet's mean pixel
    tint = np.array([1.0, 0.0, -1.0])
    img = mean_rgb + 55.0 * lum[..., None] + 12.0 * chroma[..., None] * tint
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def input_scale_mismatch(state: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Per flavour, the median over conv1's channels of ``|log(recorded / predicted)|``
    second moment of ``body.bn1``'s input; None when the state dict lacks those tensors."""
    keys = ("body.conv1.weight", "body.bn1.running_mean", "body.bn1.running_var")
    if not all(k in state for k in keys):
        return None
    weight, mean, var = (state[k].float() for k in keys)
    recorded = (var + mean**2).clamp_min(1e-12)
    img = probe_image()
    out = {}
    for name, flavour in FLAVOURS.items():
        x = torch.from_numpy(np.ascontiguousarray(flavour.normalise(img).transpose(2, 0, 1)))
        y = F.conv2d(x[None], weight, stride=2, padding=3)  # torchvision ResNet's conv1
        predicted = (y**2).mean(dim=(0, 2, 3)).clamp_min(1e-12)
        out[name] = float((recorded / predicted).log().abs().median())
    return out


def decide_flavour(
    state: dict[str, torch.Tensor], path: Path, choice: FlavourChoice = "auto"
) -> tuple[Flavour, str]:
    """The preprocessing ``state`` (as read from ``path``) was trained with, and why.

    See the module docstring for the order of the checks. Raises
    :class:`RetinaFaceFlavourError` for a MobileNet checkpoint and for an unmarked one whose
    BatchNorm statistics fit neither convention clearly.
    """
    if any(k.removeprefix("module.").startswith(_MOBILENET_MARK) for k in state):
        raise RetinaFaceFlavourError(
            f"{path} is a MobileNet-0.25 RetinaFace (biubug6's mobilenet0.25_Final.pth): "
            "retinaface-pytorch builds only the ResNet-50 network; use Resnet50_Final.pth "
            f"or {RETINAFACE_HUB_FILE}"
        )
    if choice != "auto":
        return FLAVOURS[choice], f"faces.retinaface_flavour = {choice}"
    if state and all(k.startswith("module.") for k in state):
        return FLAVOURS["biubug6"], "keys prefixed 'module.', as biubug6's Resnet50_Final.pth"
    if _hub_zip_member(path) is not None:
        return FLAVOURS["retinaface-pytorch"], "torch-hub zip, as retinaface-pytorch ships"
    fit = input_scale_mismatch(state)
    if fit is not None:
        (best, best_fit), (_, other_fit) = sorted(fit.items(), key=lambda kv: kv[1])
        if other_fit - best_fit >= PROBE_MARGIN_NATS:
            return FLAVOURS[best], (
                f"body.bn1 statistics fit {best} input (mismatch {best_fit:.1f} vs "
                f"{other_fit:.1f} nats)"
            )
    figures = ", ".join(f"{k} {v:.1f}" for k, v in fit.items()) if fit else "no body.bn1"
    raise RetinaFaceFlavourError(
        f"cannot tell which preprocessing the RetinaFace weights at {path} were trained with "
        f"(no 'module.' prefix, not the hub zip, BatchNorm mismatch in nats: {figures}); set "
        "faces.retinaface_flavour to 'biubug6' (BGR minus 104,117,123) or "
        "'retinaface-pytorch' (RGB, ImageNet mean/std)"
    )


def load_retinaface_model(
    weights_path: Path | None,
    device: str = "cpu",
    max_size: int = 640,
    flavour: FlavourChoice = "auto",
) -> RetinaFaceWeights:
    """Build ``retinaface.predict_single.Model``, load weights and decide their flavour.

    ``weights_path=None`` leaves the network randomly initialised (tests only) with the
    package's own preprocessing unless ``flavour`` names another.
    """
    from retinaface.predict_single import Model

    model = Model(max_size=max_size, device=device)
    if weights_path is None:
        name = "retinaface-pytorch" if flavour == "auto" else flavour
        chosen, why = FLAVOURS[name], "random initialisation"
    else:
        state = load_retinaface_state_dict(weights_path)
        chosen, why = decide_flavour(state, weights_path, flavour)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    return RetinaFaceWeights(model, weights_path is not None, chosen, why)
