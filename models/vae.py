"""Image VAEs for latent features: diffusers ``AutoencoderKL`` in FLUX.1 and SD layouts.

Families (``ModelSpec.family``):

- ``vae-flux1``: FLUX.1 VAE, 16 latent channels, ``scaling_factor=0.3611``,
  ``shift_factor=0.1159`` (hub: ``black-forest-labs/FLUX.1-schnell``, subfolder ``vae``).
- ``vae-sd``: Stable Diffusion VAE, 4 latent channels, ``scaling_factor=0.18215``, no shift
  (hub: ``stabilityai/sd-vae-ft-mse``).

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
from diffusers import AutoencoderKL

from models.registry import ModelUnavailableError, register_tiny_builder

LATENT_STRIDE = 8

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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_vae(
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a local directory or a hub id, in eval mode.

    Local directories and ``HF_HUB_OFFLINE=1`` use ``local_files_only=True`` so nothing is
    fetched; a missing model raises :class:`ModelUnavailableError` with the path in it.
    """
    local = Path(path_or_hub_id).exists()
    try:
        vae = AutoencoderKL.from_pretrained(
            str(path_or_hub_id),
            subfolder=subfolder,
            revision=revision,
            torch_dtype=dtype,
            local_files_only=local or _offline(),
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load VAE from {path_or_hub_id!s}: {exc}") from exc
    return vae.to(device).eval()


def latent_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """``(scale, shift)`` of a VAE config; a missing shift is 0."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return float(scale if scale is not None else 1.0), float(shift or 0.0)


@torch.inference_mode()
def encode_frames(vae: AutoencoderKL, frames: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """Encode uint8 RGB frames ``(N, H, W, 3)`` to normalised latents ``(N, C, H/8, W/8)``.

    Frames are mapped to [-1, 1]; ``H`` and ``W`` must be multiples of 8. Returns float32 on
    the CPU, whatever the VAE's device and dtype.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got shape {frames.shape}")
    n, h, w, _ = frames.shape
    if h % LATENT_STRIDE or w % LATENT_STRIDE:
        raise ValueError(f"frame size {w}x{h} is not a multiple of {LATENT_STRIDE}")
    scale, shift = latent_factors(vae)
    param = next(vae.parameters())
    out = []
    for start in range(0, n, max(1, batch_size)):
        chunk = torch.from_numpy(np.array(frames[start : start + batch_size], copy=True))
        x = chunk.permute(0, 3, 1, 2).to(param.device, torch.float32) / 127.5 - 1.0
        z = vae.encode(x.to(param.dtype)).latent_dist.mode()
        out.append(((z.float() - shift) * scale).cpu())
    if not out:
        return torch.empty(0, vae.config.latent_channels, h // LATENT_STRIDE, w // LATENT_STRIDE)
    return torch.cat(out)


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Decode normalised latents ``(N, C, h, w)`` to uint8 RGB frames ``(N, 8h, 8w, 3)``."""
    if latents.ndim != 4:
        raise ValueError(f"expected (N, C, h, w) latents, got shape {tuple(latents.shape)}")
    scale, shift = latent_factors(vae)
    param = next(vae.parameters())
    out = []
    for start in range(0, latents.shape[0], max(1, batch_size)):
        z = latents[start : start + batch_size].to(param.device, torch.float32) / scale + shift
        x = vae.decode(z.to(param.dtype)).sample.float()
        img = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        out.append(img.permute(0, 2, 3, 1).cpu().numpy())
    if not out:
        _, _, h, w = latents.shape
        return np.zeros((0, h * LATENT_STRIDE, w * LATENT_STRIDE, 3), np.uint8)
    return np.concatenate(out)
