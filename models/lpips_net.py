"""LPIPS (Zhang et al. 2018, v0.1): torchvision AlexNet / VGG-16 features + learned 1×1 heads.

An own implementation whose two weight files are the official ones, read from a local folder:

- the backbone: torchvision's ImageNet state dict (``alexnet-owt-7be5be79.pth`` or
  ``vgg16-397923af.pth``; only its ``features.*`` keys are used, all of them strictly);
- the linear heads: the ``lpips`` package's ``weights/v0.1/{alex,vgg}.pth``
  (``lin{k}.model.1.weight``, ``[1, C_k, 1, 1]``, non-negative).

Distance, as the reference: inputs RGB in ``[-1, 1]`` are shifted and scaled by the
ImageNet constants of the reference ScalingLayer, the ReLU outputs of 5 stages are unit-
normalised along channels (``x / (‖x‖ + 1e-10)``), squared differences are weighted by the
head, averaged over space and summed over stages. Not a metric in the strict sense: 0 for
identical images, larger is more different.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import alexnet, vgg16

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

Backbone = Literal["alex", "vgg"]
BACKBONE_FILES: dict[str, str] = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
HEAD_FILES: dict[str, str] = {"alex": "alex.pth", "vgg": "vgg.pth"}
# ReLU outputs: ``features[start:stop]`` per stage, as the reference slices the backbones
_STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
_CHANNELS: dict[str, tuple[int, ...]] = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def family(net: Backbone) -> str:
    return f"lpips-{net}"


class _Head(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self, net: Backbone) -> None:
        super().__init__()
        self.net_name = net
        self.features = (alexnet if net == "alex" else vgg16)(weights=None).features
        self.stages = _STAGES[net]
        self.heads = nn.ModuleDict({f"lin{i}": _Head(c) for i, c in enumerate(_CHANNELS[net])})
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in ``[-1, 1]`` pairs → ``[B]`` distances."""
        xa, xb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for i, (start, stop) in enumerate(self.stages):
            layers = self.features[start:stop]
            xa, xb = layers(xa), layers(xb)
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weighted = self.heads[f"lin{i}"].model((na - nb) ** 2)
            total = total + weighted.mean(dim=(1, 2, 3))
        return total


def load_lpips(directory: str | Path, net: Backbone, device: str | torch.device = "cpu") -> LPIPS:
    """Load backbone and heads from ``directory`` (official file names, see module doc)."""
    folder = Path(directory).expanduser()
    backbone, heads = folder / BACKBONE_FILES[net], folder / HEAD_FILES[net]
    for f, what in ((backbone, "torchvision ImageNet backbone"), (heads, "lpips v0.1 heads")):
        if not f.is_file():
            raise ModelUnavailableError(
                f"LPIPS-{net}: {what} not found at {f}; put {BACKBONE_FILES[net]} (torchvision) "
                f"and {HEAD_FILES[net]} (lpips package, weights/v0.1/) in one folder and "
                f"import it with `talkforge models import {family(net)} <folder>`"
            )
    model = LPIPS(net)
    state = read_state_dict(backbone)
    feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    out_channels = {
        int(k.split(".")[0]): v.shape[0] for k, v in feats.items() if k.endswith(".weight")
    }
    _reshape(model, out_channels)
    load_into(model.features, feats, backbone, what=f"torchvision {net} features")
    load_into(model.heads, read_state_dict(heads), heads, what=f"lpips v0.1 {net} linear heads")
    return model.to(device).eval()


def _reshape(model: LPIPS, out_channels: dict[int, int]) -> None:
    """Give convolution ``i`` of the backbone ``out_channels[i]`` filters (inputs following
    the previous one) and the heads the matching widths. The official files are full width
    and change nothing; the random stand-ins of smoke runs are narrower (cheap on a CPU),
    same layers, same files, same loader."""
    cin = 3
    widths: list[int] = []
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.Conv2d):
            cout = out_channels.get(i, layer.out_channels)
            if (cin, cout) != (layer.in_channels, layer.out_channels):
                model.features[i] = nn.Conv2d(
                    cin, cout, layer.kernel_size, layer.stride, layer.padding
                )
            cin = cout
        if any(stop == i + 1 for _, stop in model.stages):
            widths.append(cin)
    for k, width in enumerate(widths):
        if model.heads[f"lin{k}"].model[1].in_channels != width:
            model.heads[f"lin{k}"] = _Head(width)


def save_lpips(model: LPIPS, directory: Path) -> None:
    """Write the two files in the official layouts (``features.*``; ``lin{k}.model.1.weight``)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = model.net_name
    feats = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save(feats, directory / BACKBONE_FILES[net])
    torch.save(model.heads.state_dict(), directory / HEAD_FILES[net])


TINY_WIDTH_DIVISOR = 8  # random stand-ins: every convolution 1/8 as wide (~1/64 the cost)


def _build_random(net: Backbone, directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = LPIPS(net)
    _reshape(
        model,
        {i: max(4, m.out_channels // TINY_WIDTH_DIVISOR)
         for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)},
    )  # fmt: skip
    for head in model.heads.values():
        nn.init.uniform_(head.model[1].weight, 0.0, 0.2)  # heads are non-negative
    save_lpips(model, directory)


@register_tiny_builder("lpips-alex")
def build_random_lpips_alex(directory: Path, seed: int) -> None:
    """Random-init AlexNet backbone and heads, 1/8 width (same layers and file layout)."""
    _build_random("alex", directory, seed)


@register_tiny_builder("lpips-vgg")
def build_random_lpips_vgg(directory: Path, seed: int) -> None:
    """Random-init VGG-16 backbone and heads, 1/8 width (same layers and file layout)."""
    _build_random("vgg", directory, seed)


def lpips_spec(net: Backbone, source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=family(net), source=source, tiny_random=tiny_random)
