"""ArcFace identity embeddings: the InsightFace ``iresnet`` in its official state-dict layout.

An own implementation of the improved ResNet of ``arcface_torch`` (``conv1``/``bn1``/``prelu``
stem, ``layer1…4`` of pre-activation basic blocks ``bn1→conv1→bn2→prelu→conv2(stride)→bn3``
with a 1×1 ``downsample``, then ``bn2 → fc (C·7·7 → 512) → features`` (BatchNorm1d)), so the
official ``backbone.pth`` files (``ms1mv3_arcface_r50_fp16``, ``glint360k_cosface_r100``, …)
load with ``strict=True``. The depth (blocks per stage) and widths are read from the file's
keys and shapes, so r18 / r34 / r50 / r100 all load through the one loader, and the random
stand-in is small (1 block per stage, widths 8…64, labelled ``random-init``).

Input: the 112×112 face aligned to the ArcFace 5-point template (the faces stage's
``align: landmarks`` geometry), RGB, ``(x / 255 − 0.5) / 0.5``. Output: 512-d embeddings;
identity similarity is their cosine.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "arcface"
WEIGHTS_FILE = "backbone.pth"
INPUT_PX = 112
EMBED_DIM = 512
OFFICIAL_WIDTHS = (64, 128, 256, 512)
TINY_LAYERS, TINY_WIDTHS = (1, 1, 1, 1), (8, 16, 32, 64)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 14, 3),
        widths: tuple[int, ...] = OFFICIAL_WIDTHS,
        stem: int = 64,
    ) -> None:
        super().__init__()
        self.layers, self.widths, self.stem = tuple(layers), tuple(widths), stem
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        cin = stem
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = [_Block(cin, w, 2)] + [_Block(w, w, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * 7 * 7, EMBED_DIM)
        self.features = nn.BatchNorm1d(EMBED_DIM, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 112, 112]`` normalised RGB → ``[B, 512]`` embeddings."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(len(self.layers)):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.features(self.fc(self.dropout(self.bn2(x).flatten(1))))


def arch_from_state(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(blocks per stage, stage widths, stem width)`` read from an iresnet state dict."""
    counts: dict[int, int] = {}
    widths: dict[int, int] = {}
    for key, value in state.items():
        m = re.fullmatch(r"layer(\d+)\.(\d+)\.conv1\.weight", key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            counts[stage] = max(counts.get(stage, 0), block + 1)
            widths[stage] = int(value.shape[0])
    if (
        "conv1.weight" not in state
        or sorted(counts) != list(range(1, len(counts) + 1))
        or not counts
    ):
        raise ModelUnavailableError("not an iresnet state dict (no conv1 / layerN.K.conv1 keys)")
    stages = sorted(counts)
    stem = int(state["conv1.weight"].shape[0])
    return tuple(counts[s] for s in stages), tuple(widths[s] for s in stages), stem


def weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_arcface(path: str | Path, device: str | torch.device = "cpu") -> IResNet:
    """Load an official arcface_torch ``backbone.pth`` (or a directory holding it) strictly."""
    file = weights_file(Path(path).expanduser())
    if not file.is_file():
        raise ModelUnavailableError(
            f"ArcFace weights not found at {file}; import an arcface_torch {WEIGHTS_FILE} "
            f"(e.g. ms1mv3_arcface_r100) with `talkforge models import {FAMILY} <file>`"
        )
    state = read_state_dict(file, containers=("state_dict",), strip_prefix="module.")
    layers, widths, stem = arch_from_state(state)
    model = IResNet(layers, widths, stem)
    load_into(model, state, file, what=f"iresnet with blocks {list(layers)}, widths {list(widths)}")
    return model.to(device).eval()


def arcface_input(aligned_rgb: np.ndarray) -> torch.Tensor:
    """``(N, 112, 112, 3)`` uint8 RGB aligned faces → normalised ``[N, 3, 112, 112]``."""
    if aligned_rgb.ndim != 4 or aligned_rgb.shape[1:] != (INPUT_PX, INPUT_PX, 3):
        raise ValueError(f"expected (N, {INPUT_PX}, {INPUT_PX}, 3) faces, got {aligned_rgb.shape}")
    x = torch.from_numpy(np.ascontiguousarray(aligned_rgb)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - 0.5) / 0.5


@register_tiny_builder(FAMILY)
def build_tiny_arcface(directory: Path, seed: int) -> None:
    """A small random iresnet (1 block per stage, widths 8…64) in the official key layout."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(IResNet(TINY_LAYERS, TINY_WIDTHS, stem=8).state_dict(), directory / WEIGHTS_FILE)


def arcface_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
