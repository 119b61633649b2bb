"""Where RetinaFace's weights come from and how they load (no network access, ever).

``retinaface-pytorch``'s ResNet-50 weights are a local state-dict file or the torch hub cache
file :data:`RETINAFACE_HUB_FILE` (a legacy one-member zip), always read through
``torch.load(weights_only=True)``. :class:`models.face_detector.RetinaFaceDetector` runs them.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.registry import ModelUnavailableError

RETINAFACE_HUB_FILE = "retinaface_resnet50_2020-07-20-f168fae3c.zip"


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


def load_retinaface_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict file or the torch hub legacy zip (one member), weights only."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            # torch.save's own zip always has several members (data.pkl, version, ...).
            if len(members) == 1:
                blob = io.BytesIO(zf.read(members[0]))
                return torch.load(blob, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_retinaface_model(
    weights_path: Path | None, device: str = "cpu", max_size: int = 640
) -> tuple[Any, bool]:
    """Build ``retinaface.predict_single.Model`` and load weights; returns (model, pretrained).

    ``weights_path=None`` leaves the network randomly initialised (tests only).
    """
    from retinaface.predict_single import Model

    model = Model(max_size=max_size, device=device)
    if weights_path is not None:
        state = load_retinaface_state_dict(weights_path)
        # Checkpoints saved from a DataParallel model carry a "module." prefix.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    model.eval()
    return model, weights_path is not None
