"""I3D (Carreira & Zisserman 2017, Inception-v1 inflated to 3D) video features for FVD.

An own implementation with the parameter names of the widely used PyTorch port's state dict
(``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_mean``, …, ``logits.conv3d.*``;
the layout of ``rgb_imagenet.pt`` from pytorch-i3d and of cd-fvd's ``i3d_pretrained_400.pt``),
so a Kinetics-400 checkpoint loads strictly. Convolutions and max pools pad as TensorFlow's
``SAME`` (computed per input size), batch norms use ``eps=1e-3``.

Input: ``[B, 3, T, 224, 224]`` RGB scaled to ``[-1, 1]``; T = 16 for the LatentSync FVD
protocol. The feature is the 400-d output of the logits layer (before softmax), averaged
over the remaining time steps: the quantity the FVD reference detectors return. The weights
are in no wheel (``talkforge models import i3d <file>``); the random stand-in is full size
(12.7 M parameters) and labelled ``random-init``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "i3d"
WEIGHTS_FILE = "i3d_pretrained_400.pt"
NUM_CLASSES = 400

Triple = tuple[int, int, int]


def _same_pad(size: tuple[int, ...], kernel: Triple, stride: Triple) -> list[int]:
    """``F.pad`` amounts (last dim first) for TF ``SAME`` padding of a ``[T, H, W]`` input."""
    pads: list[int] = []
    for s, k, st in zip(reversed(size), reversed(kernel), reversed(stride), strict=True):
        total = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        norm_act: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.norm_act = kernel, stride, norm_act
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=not norm_act)
        if norm_act:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride)))
        return F.relu(self.bn(x)) if self.norm_act else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class Mixed(nn.Module):
    """Inception module: 1×1 | 1×1→3×3 | 1×1→3×3 | 3×3 max pool→1×1, concatenated."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1
        )


_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class I3D(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b, self.Mixed_3c = (Mixed(*_MIXED[k]) for k in ("Mixed_3b", "Mixed_3c"))
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        for k in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, k, Mixed(*_MIXED[k]))
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b, self.Mixed_5c = (Mixed(*_MIXED[k]) for k in ("Mixed_5b", "Mixed_5c"))
        self.logits = Unit3D(1024, num_classes, norm_act=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` RGB in ``[-1, 1]`` → ``[B, 400]`` pre-softmax logits."""
        x = video
        for name, _ in self.named_children():
            if name == "logits":
                break
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (min(2, x.shape[2]), x.shape[3], x.shape[4]), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))


def weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> I3D:
    """Load a Kinetics-400 I3D state dict (``weights_only=True``) strictly, in eval mode."""
    file = weights_file(Path(path).expanduser())
    if not file.is_file():
        raise ModelUnavailableError(
            f"I3D weights not found at {file}; import a Kinetics-400 I3D state dict "
            f"(e.g. cd-fvd's {WEIGHTS_FILE}) with `talkforge models import {FAMILY} <file>`"
        )
    model = I3D()
    load_into(
        model,
        read_state_dict(file, containers=("state_dict",), strip_prefix="module."),
        file,
        what="I3D (Conv3d_1a_7x7 … Mixed_5c, logits; 400 classes)",
    )
    return model.to(device).eval()


@register_tiny_builder(FAMILY)
def build_random_i3d(directory: Path, seed: int) -> None:
    """A random-init, full-size I3D in the official key layout (tests, smoke runs)."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(I3D().state_dict(), directory / WEIGHTS_FILE)


def i3d_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
