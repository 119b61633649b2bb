"""LPIPS per frame pair through :mod:`models.lpips_net` (AlexNet or VGG-16 backbone).

Frames are uint8 RGB, mapped to ``[-1, 1]`` as the reference expects (``x / 127.5 − 1``),
at their own size (the reference does not resize). The clip value is the mean over frames.
"""

from __future__ import annotations

import numpy as np
import torch

from models.lpips_net import LPIPS


def to_unit_range(frames: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``[N, 3, H, W]`` float in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.inference_mode()
def lpips_per_frame(
    model: LPIPS, generated: np.ndarray, truth: np.ndarray, batch: int = 16
) -> np.ndarray:
    """LPIPS of each ``(generated[i], truth[i])`` pair, ``(N,)`` float64."""
    if generated.shape != truth.shape:
        raise ValueError(f"shapes differ: {generated.shape} vs {truth.shape}")
    device = next(model.parameters()).device
    out = [
        model(
            to_unit_range(generated[i : i + batch], device),
            to_unit_range(truth[i : i + batch], device),
        )
        .double()
        .cpu()
        .numpy()
        for i in range(0, len(generated), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0)
