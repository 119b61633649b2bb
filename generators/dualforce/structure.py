"""Stage 1's structure token projector: LivePortrait motion (133) ↔ structure latent (d_s).

The diffusion stream noises a compact structure latent, not the raw motion columns (which
mix degrees, keypoint coordinates and scale on very different scales). The projector
standardises motion and FLAME with the training set's per-column statistics (buffers, so a
checkpoint carries them; stage 1 sets them with :meth:`set_statistics` from
:func:`column_statistics` of all training frames), encodes motion to ``d_s`` through an MLP and a
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


def column_statistics(x: torch.Tensor) -> torch.Tensor:
    """``(2, D)``: per-column mean and std over all rows of ``(..., D)``; a constant column
    gets std 1, so it standardises to 0 instead of dividing by zero."""
    flat = x.reshape(-1, x.shape[-1]).double()
    std = flat.std(0, unbiased=False)
    return torch.stack([flat.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std))]).float()


class StructureProjector(nn.Module):
    """Motion ``(..., 133)`` → latent ``(..., d_s)`` → motion, and latent → FLAME ``(..., 159)``."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        hidden_dim = arch.projector_hidden_dim
        self.register_buffer("motion_mean", torch.zeros(arch.motion_dim))
        self.register_buffer("motion_std", torch.ones(arch.motion_dim))
        self.register_buffer("flame_mean", torch.zeros(arch.flame_dim))
        self.register_buffer("flame_std", torch.ones(arch.flame_dim))
        self.encoder = _mlp(arch.motion_dim, hidden_dim, arch.struct_latent_dim)
        self.decoder = _mlp(arch.struct_latent_dim, hidden_dim, arch.motion_dim)
        self.flame = _mlp(arch.struct_latent_dim, hidden_dim, arch.flame_dim)

    @torch.no_grad()
    def set_statistics(self, motion_stats: torch.Tensor, flame_stats: torch.Tensor) -> None:
        """Copy :func:`column_statistics` of the training motion and FLAME into the buffers."""
        self.motion_mean.copy_(motion_stats[0])
        self.motion_std.copy_(motion_stats[1])
        self.flame_mean.copy_(flame_stats[0])
        self.flame_std.copy_(flame_stats[1])

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
