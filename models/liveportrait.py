"""LivePortrait motion extractor (the "M" network): per-frame head pose, keypoints, expression.

Family ``liveportrait-motion``. A ConvNeXt-V2 backbone (official: depths ``[3, 3, 9, 3]``,
dims ``[96, 192, 384, 768]``, 28.1 M parameters) with seven linear heads. Parameter names and
shapes match the official ``liveportrait/base_models/motion_extractor.pth`` (HF
``KwaiVGI/LivePortrait``): a plain state dict whose 212 keys all start with ``detector.``,
loaded here with ``load_state_dict(strict=True)`` exactly as the official loader does.

Input contract: ``(B, 3, 256, 256)`` RGB float in ``[0, 1]`` (uint8 / 255, no mean/std
normalisation), i.e. a face crop in LivePortrait's framing resized to 256.

Framing (:func:`crop_affine`, LivePortrait's ``parse_rect_from_landmark`` +
``_estimate_similar_transform_from_pts`` with its default crop arguments ``scale 2.3,
vx_ratio 0, vy_ratio -0.125``): the face's dense-landmark box is measured in the face's own
axes (``uy`` from the eye centre to the lip centre, ``ux`` perpendicular), made square
(``max(w, h)``) and scaled by :data:`CROP_SCALE`; its centre moves by
:data:`CROP_VY_RATIO` × the scaled side along ``uy`` (up, to take in the forehead); the crop
is rotated with the face so the eyes are level. (Its driving-video cropper uses 2.2 and
-0.1; the source framing is the one the motion extractor was trained on.)

Per-frame motion vector (:data:`MOTION_LAYOUT`, 133 float32 columns, in this order):

- ``kp`` (63): canonical implicit keypoints, 21 × (x, y, z) row-major (column ``3i + j``).
- ``exp`` (63): expression deformation, same 21 × 3 layout.
- ``pitch``, ``yaw``, ``roll`` (1 each): degrees, the softmax expectation over 66 bins of
  3° each, ``Σ softmax(logits)_k · k · 3 − 97.5`` (LivePortrait's ``headpose_pred_to_degree``),
  so always within ``[-97.5, 97.5]``.
- ``t`` (3): translation (tx, ty, tz); LivePortrait's keypoint transform uses only tx, ty.
- ``scale`` (1).

LivePortrait's driving keypoints are ``scale · (kp @ R(pitch, yaw, roll) + exp) + [tx, ty, 0]``.

A model directory holds ``motion_extractor.pth`` and, for non-official sizes,
``motion_extractor.json`` (``{"depths": [...], "dims": [...]}``); without the JSON the
official architecture is assumed, so the official file can be dropped in as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import load_into, read_state_dict
from models.registry import ModelUnavailableError, register_tiny_builder

FAMILY = "liveportrait-motion"
WEIGHTS_FILE = "motion_extractor.pth"
CONFIG_FILE = "motion_extractor.json"
INPUT_SIZE = 256
NUM_KP = 21
NUM_BINS = 66
BIN_DEGREES = 3.0
MAX_DEGREES = 97.5  # (NUM_BINS - 1) * BIN_DEGREES / 2
CROP_SCALE = 2.3  # LivePortrait's crop arguments (src/config/argument_config.py)
CROP_VY_RATIO = -0.125

MOTION_LAYOUT: tuple[tuple[str, int], ...] = (
    ("kp", 3 * NUM_KP),
    ("exp", 3 * NUM_KP),
    ("pitch", 1),
    ("yaw", 1),
    ("roll", 1),
    ("t", 3),
    ("scale", 1),
)
MOTION_DIM = sum(size for _, size in MOTION_LAYOUT)  # 133


def motion_slices() -> dict[str, slice]:
    """Column slice of each :data:`MOTION_LAYOUT` entry in a ``(T, 133)`` motion array."""
    out: dict[str, slice] = {}
    start = 0
    for name, size in MOTION_LAYOUT:
        out[name] = slice(start, start + size)
        start += size
    return out


@dataclass(frozen=True)
class MotionArch:
    """Backbone size: blocks per stage and channels per stage (four stages each)."""

    depths: tuple[int, int, int, int] = (3, 3, 9, 3)
    dims: tuple[int, int, int, int] = (96, 192, 384, 768)

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"need 4 depths and 4 dims, got {self.depths} and {self.dims}")


OFFICIAL_ARCH = MotionArch()
TINY_ARCH = MotionArch(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``(N, C, H, W)`` (eps 1e-6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last ``(N, H, W, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the spatial L2 norm is taken in float32: under fp16 autocast it could overflow
        gx = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.gamma * (x * nx) + self.beta + x


class _Block(nn.Module):
    """Depthwise 7×7 → LN → Linear(4d) → GELU → GRN → Linear(d), plus the residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = _GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class _ConvNeXtV2Heads(nn.Module):
    """Backbone, global average pool + LayerNorm, then the seven LivePortrait heads."""

    def __init__(self, arch: MotionArch) -> None:
        super().__init__()
        dims = arch.dims
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                    _ChannelsFirstLayerNorm(dims[0], eps=1e-6),
                )
            ]
            + [
                nn.Sequential(
                    _ChannelsFirstLayerNorm(dims[i], eps=1e-6),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
                for i in range(3)
            ]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(_Block(dim) for _ in range(depth)))
            for depth, dim in zip(arch.depths, dims, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc_kp = nn.Linear(dims[-1], 3 * NUM_KP)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], NUM_BINS)
        self.fc_yaw = nn.Linear(dims[-1], NUM_BINS)
        self.fc_roll = nn.Linear(dims[-1], NUM_BINS)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * NUM_KP)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        feat = self.norm(x.mean(dim=(-2, -1)))
        return {
            "kp": self.fc_kp(feat),
            "exp": self.fc_exp(feat),
            "pitch": self.fc_pitch(feat),
            "yaw": self.fc_yaw(feat),
            "roll": self.fc_roll(feat),
            "t": self.fc_t(feat),
            "scale": self.fc_scale(feat),
        }


class MotionExtractor(nn.Module):
    """LivePortrait's motion extractor; all parameters live under ``detector.``.

    ``forward(x)`` takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` (H = W = 256 in LivePortrait)
    and returns the raw heads: ``kp``/``exp`` ``(B, 63)``, ``pitch``/``yaw``/``roll``
    ``(B, 66)`` bin logits, ``t`` ``(B, 3)``, ``scale`` ``(B, 1)``.
    """

    def __init__(self, arch: MotionArch = OFFICIAL_ARCH) -> None:
        super().__init__()
        self.arch = arch
        self.detector = _ConvNeXtV2Heads(arch)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(x)


def headpose_logits_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 66)`` bin logits → ``(B,)`` float32 degrees: ``E_softmax[bin] · 3 − 97.5``.

    Computed in float64 (66 values per row, so the cost is nil): in float32 the rounding of
    the expectation alone is ~1e-5°, larger than the logits' own batch-to-batch noise.
    """
    if logits.shape[-1] != NUM_BINS:
        raise ValueError(f"expected {NUM_BINS} pose bins, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.double(), dim=-1)
    bins = torch.arange(NUM_BINS, device=logits.device, dtype=torch.float64)
    return ((probs * bins).sum(dim=-1) * BIN_DEGREES - MAX_DEGREES).float()


def random_motion_extractor(arch: MotionArch, seed: int) -> MotionExtractor:
    """A randomly initialised extractor; GRN gains are made non-zero so GRN is exercised."""
    torch.manual_seed(seed)
    model = MotionExtractor(arch)
    for name, param in model.named_parameters():
        if name.endswith(("grn.gamma", "grn.beta")):
            nn.init.normal_(param, std=0.1)
    return model.eval()


def save_motion_extractor(model: MotionExtractor, directory: Path) -> Path:
    """Write ``motion_extractor.pth`` (plain state dict) and its architecture JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    torch.save(model.state_dict(), weights)
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.arch)))
    return weights


@register_tiny_builder(FAMILY)
def build_tiny_motion_extractor(directory: Path, seed: int) -> None:
    """Tiny random extractor (depths 1,1,1,1; dims 8,16,32,64) with the official key names."""
    save_motion_extractor(random_motion_extractor(TINY_ARCH, seed), directory)


def _read_arch(config: Path) -> MotionArch:
    try:
        raw = json.loads(config.read_text())
        return MotionArch(depths=tuple(raw["depths"]), dims=tuple(raw["dims"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailableError(f"bad motion extractor config {config}: {exc}") from exc


def load_motion_extractor(
    path_or_dir: str | Path, device: str | torch.device = "cpu"
) -> MotionExtractor:
    """Load an extractor in eval mode from a directory or a ``.pth`` file, strictly.

    The architecture comes from the JSON of the same stem beside the weights
    (``motion_extractor.json``), else the official one. The file is read with
    ``weights_only=True`` (:func:`models.checkpoints.read_state_dict`); any missing,
    unexpected or mis-shaped key raises :class:`~models.checkpoints.CheckpointMismatchError`
    (a :class:`ModelUnavailableError`) naming them.
    """
    path = Path(path_or_dir).expanduser()
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ModelUnavailableError(
            f"LivePortrait motion extractor weights not found at {weights}; put the official "
            f"{WEIGHTS_FILE} there (HF KwaiVGI/LivePortrait, liveportrait/base_models/) or "
            f"use tiny_random: true for an offline smoke run"
        )
    config = weights.with_suffix(".json")
    arch = _read_arch(config) if config.is_file() else OFFICIAL_ARCH
    model = MotionExtractor(arch)
    load_into(
        model,
        read_state_dict(weights),
        weights,
        what=f"the LivePortrait motion extractor with depths {list(arch.depths)}, "
        f"dims {list(arch.dims)}",
        hint=f"Expected a plain state dict with 'detector.*' keys; a non-official size needs "
        f"its {CONFIG_FILE} beside the weights.",
    )
    return model.to(device).eval()


def crop_affine(
    centre: np.ndarray, ux: np.ndarray, uy: np.ndarray, width: np.ndarray, height: np.ndarray
) -> np.ndarray:
    """``(N, 2, 3)`` source→crop affines of LivePortrait's framing, at :data:`INPUT_SIZE`.

    Inputs per frame: the dense-landmark box's centre ``(N, 2)``, its unit axes ``ux``
    (across the face) and ``uy`` (eyes → lips) ``(N, 2)``, and its extent along each
    ``(N,)``, all in source pixels. The crop of side ``2.3 · max(width, height)`` is
    centred ``-0.125`` sides along ``uy`` from the box centre, rotated so ``ux`` is the
    crop's x axis, and scaled to :data:`INPUT_SIZE` pixels with the official target centre
    (``size / 2``).
    """
    side = CROP_SCALE * np.maximum(width, height)
    centre = centre + uy * (CROP_VY_RATIO * side)[:, None]
    k = (INPUT_SIZE / side)[:, None]
    m = np.zeros((len(side), 2, 3))
    m[:, 0, :2], m[:, 1, :2] = k * ux, k * uy
    m[:, :, 2] = INPUT_SIZE / 2 - np.einsum("nij,nj->ni", m[:, :, :2], centre)
    return m


@torch.inference_mode()
def extract_motion(
    model: MotionExtractor,
    frames_uint8: np.ndarray,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Motion vectors ``(T, 133)`` float32 (layout :data:`MOTION_LAYOUT`) for RGB frames.

    ``frames_uint8`` is ``(T, 256, 256, 3)`` uint8 RGB face crops; they are scaled to
    ``[0, 1]`` on the model's device and run ``batch_size`` at a time. ``amp_dtype``
    (``torch.bfloat16`` / ``torch.float16``) enables autocast when the model is on CUDA and
    is ignored on other devices; heads are decoded in float32 either way. Frames are
    independent, so the batch size does not change the result beyond float rounding.
    """
    if frames_uint8.ndim != 4 or frames_uint8.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(
            f"expected (T, {INPUT_SIZE}, {INPUT_SIZE}, 3) frames, got {frames_uint8.shape}"
        )
    if frames_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames_uint8.dtype}")
    device = next(model.parameters()).device
    use_amp = amp_dtype is not None and device.type == "cuda"
    out: list[np.ndarray] = []
    for start in range(0, len(frames_uint8), max(1, batch_size)):
        chunk = torch.from_numpy(np.array(frames_uint8[start : start + batch_size], copy=True))
        x = chunk.to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            heads = model(x)
        decoded = {
            "kp": heads["kp"].float(),
            "exp": heads["exp"].float(),
            "pitch": headpose_logits_to_degrees(heads["pitch"])[:, None],
            "yaw": headpose_logits_to_degrees(heads["yaw"])[:, None],
            "roll": headpose_logits_to_degrees(heads["roll"])[:, None],
            "t": heads["t"].float(),
            "scale": heads["scale"].float(),
        }
        row = torch.cat([decoded[name] for name, _ in MOTION_LAYOUT], dim=1)
        out.append(row.cpu().numpy())
    if not out:
        return np.zeros((0, MOTION_DIM), np.float32)
    return np.concatenate(out)
