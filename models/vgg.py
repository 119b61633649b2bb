"""VGG19 feature extractor for perceptual losses (torchvision ImageNet weights, local folder).

MuseTalk 1.5's "VGG" loss (``musetalk/loss/vgg_face.py`` ``Vgg19``) is torchvision's
ImageNet VGG19 cut into five slices of ``features`` — ``[0:2] [2:7] [7:12] [12:21] [21:30]``,
ending at relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 — after ImageNet mean/std
normalisation of RGB in ``[0, 1]``. This module builds those slices from the official
torchvision file ``vgg19-dcbb9e9d.pth`` (only its ``features.*`` keys are used, all of them,
strictly), read with ``weights_only`` loading from a local folder: no hub, no download.

Tiny random models for tests keep the layer structure (so the slice indices hold) with
narrower convolutions; their widths are stored in ``talkforge_vgg.json`` beside the
weights, which the loader reads when present (an official folder has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vgg import make_layers

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "vgg19"
WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG19 (IMAGENET1K_V1)
WIDTHS_FILE = "talkforge_vgg.json"
OFFICIAL_WIDTHS = (64, 128, 256, 512, 512)
SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer_config(widths: tuple[int, ...]) -> list[int | str]:
    """torchvision's VGG19 ("E") layer list with the given per-stage widths."""
    repeats = (2, 2, 4, 4, 4)
    cfg: list[int | str] = []
    for width, n in zip(widths, repeats, strict=True):
        cfg += [width] * n + ["M"]
    return cfg


class VGG19Features(nn.Module):
    """``forward(rgb in [0, 1]) -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]``, frozen."""

    def __init__(self, widths: tuple[int, ...] = OFFICIAL_WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.features = make_layers(_layer_config(self.widths))
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, rgb01: torch.Tensor) -> list[torch.Tensor]:
        h = (rgb01 - self.mean) / self.std
        out = []
        for start, stop in SLICES:
            h = self.features[start:stop](h)
            out.append(h)
        return out


def load_vgg19(directory: str | Path, device: str | torch.device = "cpu") -> VGG19Features:
    """Load from ``directory/vgg19-dcbb9e9d.pth`` (plus the widths file of a tiny model)."""
    folder = Path(directory).expanduser()
    weights = folder / WEIGHTS_FILE if folder.is_dir() else folder
    if not weights.is_file():
        raise ModelUnavailableError(
            f"VGG19: {weights} not found; put torchvision's {WEIGHTS_FILE} in a folder and "
            f"import it with `talkforge models import {FAMILY} <folder>`"
        )
    widths_file = weights.parent / WIDTHS_FILE
    widths = (
        tuple(json.loads(widths_file.read_text())["widths"])
        if widths_file.is_file()
        else OFFICIAL_WIDTHS
    )
    model = VGG19Features(widths)
    state = read_state_dict(weights)
    feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    load_into(model.features, feats, weights, what="torchvision VGG19 features")
    return model.to(device).eval()


@register_tiny_builder(FAMILY)
def build_tiny_vgg19(directory: Path, seed: int) -> None:
    """A random VGG19-layout feature stack with widths 4/8/8/16/16, in the official format."""
    torch.manual_seed(seed)
    widths = (4, 8, 8, 16, 16)
    model = VGG19Features(widths)
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / WIDTHS_FILE).write_text(json.dumps({"widths": list(widths)}))


def vgg19_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
