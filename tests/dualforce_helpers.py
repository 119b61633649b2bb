"""Shared builders for the DualForce tests: tiny models with every weight active."""

from __future__ import annotations

import torch

from generators.dualforce.config import DualForceArch, tiny_arch
from generators.dualforce.model import DualForceInputs, DualForceTransformer


def active_model(arch: DualForceArch | None = None, open_gates: bool = False, seed: int = 0):
    """A tiny model whose zero-initialised parameters (AdaLN-Zero projections and tables,
    output heads, and the fusion gates when ``open_gates``) are set to random values, as after
    training, so that every path of the network carries signal. ``float64`` for exactness."""
    torch.manual_seed(seed)
    model = DualForceTransformer(arch or tiny_arch()).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gate = name.endswith(".g")
            if is_gate and not open_gates:
                continue
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def random_inputs(arch: DualForceArch, b: int = 2, t: int = 6, seed: int = 0, hw=(8, 8)):
    """Random inputs of the feature contract, float64, with per-frame σ."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return DualForceInputs(
        video=r(b, t, arch.latent_channels, *hw),
        sigma_video=torch.rand(b, t, generator=g, dtype=torch.float64),
        reference=r(b, 5, arch.reference_dim),
        structure=r(b, t, arch.struct_latent_dim),
        sigma_struct=torch.rand(b, t, generator=g, dtype=torch.float64) * 0.7,
        audio=r(b, t, arch.audio_steps_per_frame, arch.audio_dim),
    )
