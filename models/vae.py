"""Image VAEs for latent features: diffusers ``AutoencoderKL`` (FLUX.1, SD) and FLUX.2.

Families (``ModelSpec.family``):

- ``vae-flux1``: FLUX.1 VAE, 16 latent channels, ``scaling_factor=0.3611``,
  ``shift_factor=0.1159`` (hub: ``black-forest-labs/FLUX.1-schnell``, subfolder ``vae``).
- ``vae-sd``: Stable Diffusion VAE, 4 latent channels, ``scaling_factor=0.18215``, no shift
  (hub: ``stabilityai/sd-vae-ft-mse``).
- ``vae-flux2``: FLUX.2 ``AutoencoderKLFlux2``, 32 latent channels, patchified 2×2 into
  128 channels at 1/16 of the image size and normalised by the VAE's own batch-norm
  running statistics, ``(z - mean) / sqrt(var + eps)``, as the FLUX.2 pipeline does (hub:
  ``black-forest-labs/FLUX.2-dev``, subfolder ``vae``).

Both load through ``AutoencoderKL.from_pretrained``; the tiny builders write a 27 k-parameter
random model with the same block layout (four blocks, so the ×8 spatial stride is real) that
loads back through the same call. Latent normalisation follows the Flux/SD pipelines:
encode ``z = (posterior.mode() - shift) * scale``, decode ``vae.decode(z / scale + shift)``,
with ``shift = 0`` when the config has none. ``mode()`` (not ``sample()``) makes features
deterministic, so the same frames always give the same latents.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2

from models.registry import ModelUnavailableError, register_tiny_builder

LATENT_STRIDE = 8  # AutoencoderKL; FLUX.2 latents are patchified to 16 (see latent_stride)
AnyVae = AutoencoderKL | AutoencoderKLFlux2

_TINY_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)


@register_tiny_builder("vae-flux1")
def build_tiny_flux1(directory: Path, seed: int) -> None:
    """Tiny random FLUX.1-layout VAE (16 channels, real scaling/shift factors)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        **_TINY_COMMON,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(directory)


@register_tiny_builder("vae-sd")
def build_tiny_sd(directory: Path, seed: int) -> None:
    """Tiny random SD-layout VAE (4 channels, scaling 0.18215, no shift, quant convs)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_TINY_COMMON, latent_channels=4, scaling_factor=0.18215)
    vae.save_pretrained(directory)


@register_tiny_builder("vae-flux2")
def build_tiny_flux2(directory: Path, seed: int) -> None:
    """Tiny random FLUX.2-layout VAE (32 channels, batch-norm statistics set non-trivially)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**_TINY_COMMON, latent_channels=32)
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(directory)


def _vae_class(path: Path, subfolder: str | None, family: str | None) -> type[AnyVae]:
    """The class of a local VAE from its ``config.json``, else from the family name."""
    config = path / (subfolder or "") / "config.json"
    if config.is_file():
        import json

        name = json.loads(config.read_text()).get("_class_name", "")
        return AutoencoderKLFlux2 if name == "AutoencoderKLFlux2" else AutoencoderKL
    return AutoencoderKLFlux2 if family == "vae-flux2" else AutoencoderKL


def is_flux2(vae: AnyVae) -> bool:
    return isinstance(vae, AutoencoderKLFlux2)


def latent_stride(vae: AnyVae) -> int:
    """Image pixels per latent cell: 8, or 16 for FLUX.2's patchified latents."""
    return LATENT_STRIDE * (2 if is_flux2(vae) else 1)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_vae(
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    family: str | None = None,
) -> AnyVae:
    """Load a VAE from a local directory or a hub id, in eval mode.

    The class (``AutoencoderKL`` or ``AutoencoderKLFlux2``) comes from a local
    ``config.json``; for a hub id, from ``family``.

    Local directories and ``HF_HUB_OFFLINE=1`` use ``local_files_only=True`` so nothing is
    fetched; a missing model raises :class:`ModelUnavailableError` with the path in it.
    """
    local = Path(path_or_hub_id).exists()
    cls = _vae_class(Path(path_or_hub_id), subfolder, family)
    try:
        vae = cls.from_pretrained(
            str(path_or_hub_id),
            subfolder=subfolder,
            revision=revision,
            torch_dtype=dtype,
            local_files_only=local or _offline(),
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load VAE from {path_or_hub_id!s}: {exc}") from exc
    return vae.to(device).eval()


def latent_factors(vae: AnyVae) -> tuple[float, float]:
    """``(scale, shift)`` of a VAE config; a missing shift is 0 (FLUX.2: batch norm, 1/0)."""
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return float(scale if scale is not None else 1.0), float(shift or 0.0)


@torch.inference_mode()
def encode_frames(vae: AnyVae, frames: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """Encode uint8 RGB frames ``(N, H, W, 3)`` to normalised latents ``(N, C, H/s, W/s)``.

    ``s`` is :func:`latent_stride` (8; 16 with ``C = 128`` for FLUX.2). Frames are mapped to
    [-1, 1]; ``H`` and ``W`` must be multiples of ``s``. Returns float32 on the CPU,
    whatever the VAE's device and dtype.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got shape {frames.shape}")
    n, h, w, _ = frames.shape
    stride = latent_stride(vae)
    if h % stride or w % stride:
        raise ValueError(f"frame size {w}x{h} is not a multiple of {stride}")
    scale, shift = latent_factors(vae)
    param = next(vae.parameters())
    out = []
    for start in range(0, n, max(1, batch_size)):
        chunk = torch.from_numpy(np.array(frames[start : start + batch_size], copy=True))
        x = chunk.permute(0, 3, 1, 2).to(param.device, torch.float32) / 127.5 - 1.0
        z = vae.encode(x.to(param.dtype)).latent_dist.mode().float()
        if is_flux2(vae):
            out.append(_flux2_normalise(vae, _patchify(z)).cpu())
        else:
            out.append(((z - shift) * scale).cpu())
    if not out:
        channels = vae.config.latent_channels * (4 if is_flux2(vae) else 1)
        return torch.empty(0, channels, h // stride, w // stride)
    return torch.cat(out)


def mask_lower_half(frames: np.ndarray) -> np.ndarray:
    """A copy of uint8 RGB frames ``(N, H, W, 3)`` with rows ``H//2:`` set to 0 (black).

    MuseTalk's ``get_latents_for_unet`` (``musetalk/models/vae.py``) masks a face crop this
    way before encoding it: ``x * mask`` in [0, 1] pixel space (mask 1 on rows ``:H//2``),
    then ``Normalize(0.5, 0.5)``, so the masked rows enter the encoder as -1, exactly what
    uint8 0 becomes in :func:`encode_frames`.
    """
    if frames.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) frames, got shape {frames.shape}")
    out = np.array(frames, copy=True)
    out[:, frames.shape[1] // 2 :] = 0
    return out


def _patchify(z: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` → ``(N, 4C, h/2, w/2)``, channel order ``c, dy, dx`` (FLUX.2)."""
    n, c, h, w = z.shape
    z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(n, c * 4, h // 2, w // 2)


def _unpatchify(z: torch.Tensor) -> torch.Tensor:
    n, c4, h, w = z.shape
    z = z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(n, c4 // 4, h * 2, w * 2)


def _bn_stats(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
    var = vae.bn.running_var.view(1, -1, 1, 1).to(like.device, torch.float32)
    return mean, torch.sqrt(var + vae.config.batch_norm_eps)


def _flux2_normalise(vae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    mean, std = _bn_stats(vae, z)
    return (z - mean) / std


@torch.inference_mode()
def decode_latents(vae: AnyVae, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Decode normalised latents ``(N, C, h, w)`` to uint8 RGB frames ``(N, s·h, s·w, 3)``."""
    if latents.ndim != 4:
        raise ValueError(f"expected (N, C, h, w) latents, got shape {tuple(latents.shape)}")
    scale, shift = latent_factors(vae)
    param = next(vae.parameters())
    out = []
    for start in range(0, latents.shape[0], max(1, batch_size)):
        z = latents[start : start + batch_size].to(param.device, torch.float32)
        if is_flux2(vae):
            mean, std = _bn_stats(vae, z)
            z = _unpatchify(z * std + mean)
        else:
            z = z / scale + shift
        x = vae.decode(z.to(param.dtype)).sample.float()
        img = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        out.append(img.permute(0, 2, 3, 1).cpu().numpy())
    if not out:
        _, _, h, w = latents.shape
        return np.zeros((0, h * LATENT_STRIDE, w * LATENT_STRIDE, 3), np.uint8)
    return np.concatenate(out)
