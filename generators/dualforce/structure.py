"""Stage 1's structure token projector: LivePortrait motion (133) ↔ structure latent (d_s).

The diffusion stream noises a compact structure latent, not the raw motion columns (which
mix degrees, keypoint coordinates and scale on very different scales). The projector
standardises motion and FLAME with dataset statistics (:meth:`fit_normalisation`, stored as
buffers so a checkpoint carries them), encodes motion to ``d_s`` through an MLP and a
non-affine LayerNorm (so every frame's latent has zero mean and unit variance, the scale
the flow-matching noise assumes), and is trained (stage 1) to decode the motion back and to
regress the frame's FLAME parameters from the latent, which makes the latent carry the 3D
face information FLAME describes. In stage 3 it is frozen and :meth:`encode` provides the
clean structure targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.dualforce.config import DualForceArch


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out),
    )


class StructureProjector(nn.Module):
    """Motion ``(..., 133)`` → latent ``(..., d_s)`` → motion, and latent → FLAME ``(..., 159)``."""

    def __init__(self, arch: DualForceArch, hidden_dim: int):
        super().__init__()
        self.register_buffer("motion_mean", torch.zeros(arch.motion_dim))
        self.register_buffer("motion_std", torch.ones(arch.motion_dim))
        self.register_buffer("flame_mean", torch.zeros(arch.flame_dim))
        self.register_buffer("flame_std", torch.ones(arch.flame_dim))
        self.encoder = _mlp(arch.motion_dim, hidden_dim, arch.struct_latent_dim)
        self.decoder = _mlp(arch.struct_latent_dim, hidden_dim, arch.motion_dim)
        self.flame = _mlp(arch.struct_latent_dim, hidden_dim, arch.flame_dim)

    @torch.no_grad()
    def fit_normalisation(self, motion: torch.Tensor, flame: torch.Tensor) -> None:
        """Per-column mean/std over all frames of ``(N, 133)`` motion and ``(N, 159)`` FLAME;
        constant columns get std 1 so they standardise to 0 instead of dividing by zero."""
        for x, mean, std in (
            (motion, self.motion_mean, self.motion_std),
            (flame, self.flame_mean, self.flame_std),
        ):
            flat = x.reshape(-1, x.shape[-1]).double()
            mean.copy_(flat.mean(0))
            s = flat.std(0, unbiased=False)
            std.copy_(torch.where(s > 1e-8, s, torch.ones_like(s)))

    def normalise_motion(self, motion: torch.Tensor) -> torch.Tensor:
        return (motion - self.motion_mean) / self.motion_std

    def normalise_flame(self, flame: torch.Tensor) -> torch.Tensor:
        return (flame - self.flame_mean) / self.flame_std

    def encode(self, motion: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self.normalise_motion(motion))
        return F.layer_norm(z, z.shape[-1:])

    def decode_normalised(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent → motion in LivePortrait's units (degrees, keypoint coordinates, scale)."""
        return self.decoder(latent) * self.motion_std + self.motion_mean

    def flame_normalised(self, latent: torch.Tensor) -> torch.Tensor:
        return self.flame(latent)
