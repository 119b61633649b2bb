"""Inception-v3 pool features for FID, in the layout of pytorch-fid's TF-ported weights.

Published FID numbers use the TensorFlow Inception graph of 2015-12-05. pytorch-fid ships it
converted to a PyTorch state dict, ``pt_inception-2015-12-05-6726825d.pth``: torchvision's
``Inception3`` key names (``Conv2d_1a_3x3.conv.weight`` …, ``fc`` with 1008 classes, no
auxiliary head) but four block types that differ from torchvision's in their pooling branch,
as the TF graph does:

- ``Mixed_5b/5c/5d`` (A), ``Mixed_6b…6e`` (C), ``Mixed_7b`` (E-1): the pool branch is an
  average pool that does **not** count padding (``count_include_pad=False``);
- ``Mixed_7c`` (E-2): the pool branch is a 3×3 **max** pool.

Preprocessing is pytorch-fid's: RGB in ``[0, 1]`` resized to 299×299 (bilinear,
``align_corners=False``), scaled to ``[-1, 1]``; the feature is the 2048-d global average
pool after ``Mixed_7c``. The file is read with ``weights_only=True`` and loaded strictly; it is
in no wheel (import it with ``talkforge models import inception-fid <file>``). The random
stand-in is full size (the architecture is fixed by the file: 23.8 M parameters) and is
labelled ``random-init`` by the registry.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "inception-fid"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_PX = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


def _avg_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_no_pad(x))], 1)


class _BlockC(InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):  # fmt: skip
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_no_pad(x))], 1)


class _BlockE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_no_pad(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FidInception(nn.Module):
    """Inception-v3 with the TF graph's pooling; :meth:`forward` gives 2048-d pool features."""

    def __init__(self) -> None:
        super().__init__()
        net = Inception3(num_classes=NUM_CLASSES, aux_logits=False, init_weights=False)
        net.Mixed_5b = _BlockA(192, pool_features=32)
        net.Mixed_5c = _BlockA(256, pool_features=64)
        net.Mixed_5d = _BlockA(288, pool_features=64)
        net.Mixed_6b = _BlockC(768, channels_7x7=128)
        net.Mixed_6c = _BlockC(768, channels_7x7=160)
        net.Mixed_6d = _BlockC(768, channels_7x7=160)
        net.Mixed_6e = _BlockC(768, channels_7x7=192)
        net.Mixed_7b = _BlockE(1280, max_pool=False)
        net.Mixed_7c = _BlockE(2048, max_pool=True)
        self.net = net

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in ``[0, 1]`` → ``[B, 2048]``."""
        n = self.net
        x = F.interpolate(rgb01, size=(INPUT_PX, INPUT_PX), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
                      n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c,
                      n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):  # fmt: skip
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FidInception:
    """Load ``pt_inception-2015-12-05-6726825d.pth`` (or a directory holding it) strictly."""
    file = weights_file(Path(path).expanduser())
    if not file.is_file():
        raise ModelUnavailableError(
            f"FID Inception weights not found at {file}; import pytorch-fid's {WEIGHTS_FILE} "
            f"with `talkforge models import {FAMILY} <file>`"
        )
    model = FidInception()
    load_into(
        model.net,
        read_state_dict(file),
        file,
        what="pytorch-fid's TF Inception-v3 (torchvision key names, 1008 classes, no aux head)",
    )
    return model.to(device).eval()


@register_tiny_builder(FAMILY)
def build_random_fid_inception(directory: Path, seed: int) -> None:
    """A random-init, full-size network in the official file layout (tests, smoke runs)."""
    torch.manual_seed(seed)
    net = FidInception().net
    for m in net.modules():  # He init: with identity batch norms, activations stay O(1)
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), directory / WEIGHTS_FILE)


def fid_inception_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
