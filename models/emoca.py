"""EMOCA FLAME-parameter encoder: a clean-room implementation with a checkpoint loader.

Licence note: EMOCA's code and models are MPI non-commercial research only, and its code may
not be redistributed or modified. This module copies none of it. It is written from the
published architecture (DECA/EMOCA coarse encoders: an ImageNet-style ResNet-50 followed by
an MLP regressor) using torchvision's ``ResNet``, whose layer names the checkpoint uses. The
EMOCA *weights* keep their own licence; import them locally, nothing is downloaded here.

Architecture (:class:`EmocaEncoder`), two regressors of the same structure:

- ``E_flame``: ResNet-50 (Bottleneck, blocks [3, 4, 6, 3], ``fc`` removed, global average
  pool) → ``layers = Sequential(Linear(2048, 1024), ReLU, Linear(1024, 236))``; the 236
  outputs are, in order, shape 100 | tex 50 | exp 50 | pose 6 | cam 3 | light 27.
- ``E_expression``: the same with 50 outputs; EMOCA uses them *instead of* E_flame's exp.

Key layout (assumed, see ``models.md`` §4: inferred from third-party loaders, not from a
downloaded file): the Lightning ``.ckpt`` holds ``state_dict`` with keys such as
``deca.E_flame.encoder.conv1.weight``, ``deca.E_flame.layers.0.weight`` and
``deca.E_expression.layers.2.weight``. A ``Sequential(Linear, ReLU, Linear)`` names its
Linears ``layers.0`` and ``layers.2`` (the ReLU at index 1 has no parameters). The MLP
hidden width is 1024 as in DECA's published regressor (``models.md`` §4); a checkpoint
with another width fails strict loading with the shapes in the message.

Input: ``(B, 3, 224, 224)`` RGB float in [0, 1], no mean/std normalisation. Framing
(:func:`crop_affine`, DECA/EMOCA's ``TestData``: ``bbox2point(..., type="kpt68")`` on the
axis-aligned box of the 68 FAN landmarks, then ``scale=1.25``): a square of side
``int(1.1 · 1.25 · (w + h) / 2)`` (≈ 1.375 × the box) centred on the box, not rotated,
mapped onto pixel centres 0 … 223.

Output per frame (:data:`FLAME_LAYOUT`, 159 floats): shape 100 | expression 50 (from
E_expression) | pose 6 (global rotation 3 + jaw 3, axis-angle) | cam 3 (weak-perspective
scale, tx, ty).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from models.checkpoints import check_fit, load_into, read_dropping_objects, read_state_dict
from models.registry import ModelUnavailableError, register_tiny_builder
from models.safetensors_io import save_file

INPUT_SIZE = 224
KPT68_BOX_FACTOR = 1.1  # bbox2point(type="kpt68")
CROP_SCALE = 1.25  # TestData(scale=1.25)
FEATURE_DIM = 2048  # ResNet Bottleneck output: 512 planes × expansion 4, whatever the width
E_FLAME_LAYOUT: tuple[tuple[str, int], ...] = (
    ("shape", 100),
    ("tex", 50),
    ("exp", 50),
    ("pose", 6),
    ("cam", 3),
    ("light", 27),
)
E_FLAME_DIM = sum(n for _, n in E_FLAME_LAYOUT)  # 236
EXPRESSION_DIM = 50
FLAME_LAYOUT: tuple[tuple[str, int], ...] = (
    ("shape", 100),
    ("expression", 50),
    ("pose", 6),
    ("cam", 3),
)
FLAME_DIM = sum(n for _, n in FLAME_LAYOUT)  # 159
CHECKPOINT_FILE = "emoca.ckpt"
CONFIG_FILE = "emoca_config.json"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
_WEIGHT_SUFFIXES = (*_PICKLE_SUFFIXES, ".safetensors")
_ENCODERS = ("E_flame", "E_expression")
_CONVERT_HINT = (
    "Import it with `talkforge models import emoca FILE.ckpt`: the official Lightning "
    "checkpoint is read there by a restricted unpickler (tensors and plain containers only; "
    "callbacks and hyper-parameter objects are dropped unbuilt) and converted to safetensors."
)
SAFETENSORS_FILE = "emoca.safetensors"


@dataclass(frozen=True)
class EmocaConfig:
    """Backbone shape: ``blocks`` per ResNet stage, bottleneck ``width_per_group``, MLP width.

    The default is the official architecture. Smaller values keep the parameter *names*
    of the layers that exist, but a model with fewer blocks has no ``layer3.5.*`` etc.,
    so only the default loads the official checkpoint.
    """

    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    width_per_group: int = 64
    mlp_hidden: int = 1024


TINY_CONFIG = EmocaConfig(blocks=(1, 1, 1, 1), width_per_group=8, mlp_hidden=32)


class ResnetRegressor(nn.Module):
    """``encoder`` (torchvision ResNet, ``fc`` = identity) → ``layers`` MLP → ``out_dim``."""

    def __init__(self, out_dim: int, config: EmocaConfig) -> None:
        super().__init__()
        # Same construction as torchvision.models.resnet50(weights=None) for the default config.
        self.encoder = ResNet(
            Bottleneck, list(config.blocks), width_per_group=config.width_per_group
        )
        self.encoder.fc = nn.Identity()
        self.layers = nn.Sequential(
            nn.Linear(FEATURE_DIM, config.mlp_hidden),
            nn.ReLU(),
            nn.Linear(config.mlp_hidden, out_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))


class EmocaEncoder(nn.Module):
    """EMOCA's coarse encoders ``E_flame`` (236 outputs) and ``E_expression`` (50 outputs)."""

    def __init__(self, config: EmocaConfig | None = None) -> None:
        super().__init__()
        self.config = config or EmocaConfig()
        self.E_flame = ResnetRegressor(E_FLAME_DIM, self.config)
        self.E_expression = ResnetRegressor(EXPRESSION_DIM, self.config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 224, 224)`` RGB in [0, 1] → ``(B, 159)`` in :data:`FLAME_LAYOUT` order."""
        return assemble_flame(self.E_flame(images), self.E_expression(images))


def _slices(layout: tuple[tuple[str, int], ...]) -> dict[str, slice]:
    out, start = {}, 0
    for name, size in layout:
        out[name] = slice(start, start + size)
        start += size
    return out


E_FLAME_SLICES = _slices(E_FLAME_LAYOUT)
FLAME_SLICES = _slices(FLAME_LAYOUT)


def assemble_flame(flame_code: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """``(B, 236)`` E_flame code + ``(B, 50)`` E_expression code → ``(B, 159)`` FLAME vector.

    Keeps shape, pose and cam from E_flame and replaces its exp with E_expression's;
    tex and light are dropped.
    """
    s = E_FLAME_SLICES
    return torch.cat(
        [flame_code[:, s["shape"]], expression, flame_code[:, s["pose"]], flame_code[:, s["cam"]]],
        dim=1,
    )


def _weights_file(path: Path) -> Path:
    """``path`` itself, or the single weight file under the directory ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelUnavailableError(f"EMOCA weights not found at {path}")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate"
        raise ModelUnavailableError(
            f"{what} EMOCA weight files ({', '.join(_WEIGHT_SUFFIXES)}) under {path}"
            + (f": {[str(p) for p in found]}; point the config at one" if found else "")
        )
    return found[0]


def _read_config(weights: Path) -> EmocaConfig:
    """The architecture beside the weights (:data:`CONFIG_FILE`), else the official one."""
    file = weights.parent / CONFIG_FILE
    if not file.is_file():
        return EmocaConfig()
    raw = json.loads(file.read_text())
    return EmocaConfig(
        blocks=tuple(raw["blocks"]),
        width_per_group=int(raw["width_per_group"]),
        mlp_hidden=int(raw["mlp_hidden"]),
    )


def encoder_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``E_flame``/``E_expression`` entries of a checkpoint state dict, ``deca.`` stripped.

    Keys that mention neither encoder (detail decoder, FLAME layer, losses...) are dropped.
    """
    return {
        key.removeprefix("deca."): value
        for key, value in state.items()
        if any(name in key for name in _ENCODERS)
    }


def load_emoca(path_or_dir: str | Path, device: str | torch.device = "cpu") -> EmocaEncoder:
    """Load EMOCA's encoders from a Lightning ``.ckpt``, a plain state dict or safetensors.

    ``path_or_dir`` is a weight file or a directory holding exactly one (searched
    recursively). ``.ckpt``/``.pt``/``.pth`` are read with ``torch.load(weights_only=True)``
    only; a checkpoint with pickled objects (the official Lightning ``.ckpt``) raises
    :class:`~models.checkpoints.CheckpointError` saying to import it with ``talkforge models
    import emoca``, which converts it safely (:func:`convert_for_import`). Keys containing
    ``E_flame``/``E_expression`` are kept, a leading ``deca.`` is stripped and they load
    strictly (a missing BatchNorm ``num_batches_tracked`` is filled in); anything else raises
    :class:`~models.checkpoints.CheckpointMismatchError` listing the offending keys. Both
    are :class:`ModelUnavailableError`. The architecture is read from
    :data:`CONFIG_FILE` beside the weights if present (tiny models), else the official one.
    Returns the model on ``device`` in eval mode (BatchNorm uses its running statistics).
    """
    file = _weights_file(Path(path_or_dir))
    raw = read_state_dict(file, containers=("state_dict",), hint=_CONVERT_HINT)
    state = encoder_state_dict(raw)
    if not state:
        raise ModelUnavailableError(f"{file} has no E_flame/E_expression weights")
    model = EmocaEncoder(_read_config(file))
    load_into(model, state, file, what=f"the EMOCA encoder architecture {model.config}")
    return model.to(device).eval()


def save_checkpoint(model: EmocaEncoder, directory: Path) -> Path:
    """Write ``model`` as a Lightning-style ``{"state_dict": {"deca.…": tensor}}`` checkpoint.

    Tensors only, so :func:`load_emoca` reads it with ``weights_only=True``; the
    architecture goes to :data:`CONFIG_FILE` beside it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"deca.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, directory / CHECKPOINT_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config)))
    return directory / CHECKPOINT_FILE


def convert_for_import(source: Path, out: Path) -> dict[str, Any] | None:
    """``talkforge models import emoca``: an official checkpoint file → safetensors at ``out``.

    A ``.ckpt``/``.pt``/``.pth`` file is read by
    :func:`~models.checkpoints.read_dropping_objects` (no code from it runs, no
    pytorch_lightning needed); the tensors under its ``state_dict`` that belong to the two
    encoders are checked against the architecture (:data:`CONFIG_FILE` beside the file,
    else the official one; shapes only, on the meta device) and written as
    :data:`SAFETENSORS_FILE` in the folder ``out`` (or as ``out`` itself when it ends in
    ``.safetensors``), with the architecture file when it is not the official one. Returns
    what was done (dropped globals, tensors kept and left out) for the import record;
    ``None`` for a folder or a safetensors file, which are copied as they are.
    """
    if not source.is_file() or source.suffix not in _PICKLE_SUFFIXES:
        return None
    content, dropped = read_dropping_objects(source)
    raw = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ModelUnavailableError(f"{source} holds no state_dict mapping")
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    state = encoder_state_dict(tensors)
    if not state:
        raise ModelUnavailableError(f"{source} has no E_flame/E_expression weights")
    config = _read_config(source)
    with torch.device("meta"):
        skeleton = EmocaEncoder(config)
    check_fit(skeleton, state, source, what=f"the EMOCA encoder architecture {config}")
    if out.suffix == ".safetensors":
        target = out
    else:
        out.mkdir(parents=True)
        target = out / SAFETENSORS_FILE
        if config != EmocaConfig():
            (out / CONFIG_FILE).write_text(json.dumps(asdict(config)))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return {
        "converted_from": source.name,
        "dropped_objects": dropped,
        "tensors_kept": len(state),
        "tensors_left_out": len(raw) - len(state),
    }


def crop_affine(
    left: np.ndarray, top: np.ndarray, right: np.ndarray, bottom: np.ndarray
) -> np.ndarray:
    """``(N, 2, 3)`` source→crop affines of EMOCA's framing for per-frame axis-aligned
    68-landmark boxes (source pixels): side ``int(1.1 · 1.25 · (w + h) / 2)`` around the
    box centre, its corners on the output's first and last pixel centres (``0``, ``223``)
    as the similarity ``TestData`` estimates from three corners."""
    size = np.floor(KPT68_BOX_FACTOR * CROP_SCALE * ((right - left) + (bottom - top)) / 2)
    k = (INPUT_SIZE - 1) / size
    m = np.zeros((len(size), 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = k
    m[:, 0, 2] = -k * ((left + right) / 2 - size / 2)
    m[:, 1, 2] = -k * ((top + bottom) / 2 - size / 2)
    return m


@register_tiny_builder("emoca")
def build_tiny_emoca(directory: Path, seed: int) -> None:
    """A tiny random-init EMOCA (:data:`TINY_CONFIG`) in the official checkpoint layout.

    BatchNorm running statistics are randomised too, so a loader that skipped buffers
    would change the outputs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmocaEncoder(TINY_CONFIG)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save_checkpoint(model, directory)


@torch.inference_mode()
def extract_flame(
    model: EmocaEncoder,
    frames: np.ndarray,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """FLAME vectors ``(T, 159)`` float32 for uint8 RGB face crops ``(T, 224, 224, 3)``.

    Frames are scaled to [0, 1] on the model's device and run ``batch_size`` at a time.
    ``amp_dtype`` (``features.amp_dtype``: bfloat16 / float16) enables autocast when the
    model is on CUDA; ``None`` or the CPU runs float32. The model should be in eval mode
    (as :func:`load_emoca` returns it) so results do not depend on the batch composition.
    """
    if frames.ndim != 4 or frames.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(
            f"expected (T, {INPUT_SIZE}, {INPUT_SIZE}, 3) RGB face crops, got {frames.shape}"
        )
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    device = next(model.parameters()).device
    out = [np.zeros((0, FLAME_DIM), np.float32)]
    for start in range(0, len(frames), max(1, batch_size)):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size]))
        x = chunk.to(device).permute(0, 3, 1, 2).float() / 255.0
        use_amp = amp_dtype is not None and device.type == "cuda"
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
            y = model(x)
        out.append(y.float().cpu().numpy())
    return np.concatenate(out)
