"""FID: Fréchet distance of Inception-v3 pool features of per-frame face crops.

Features come from :class:`models.inception_fid.FidInception` (pytorch-fid's TF-ported
weights; uint8 RGB frames → ``[0, 1]`` → 299 px bilinear inside the network), one 2048-d
vector per frame. FID compares all generated frames of a set with all ground-truth frames of
the same clips (:func:`metrics.frechet.frechet_of_features`); a set against itself is 0.
Published FIDs use tens of thousands of frames: on a few hundred the value is biased upward
and only comparable between runs of the same size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from metrics.frechet import frechet_of_features

if TYPE_CHECKING:
    from models.inception_fid import FidInception


def inception_features(model: FidInception, frames: np.ndarray, batch: int = 16) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 RGB → ``(N, 2048)`` float32 pool features."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch])).to(device)
            out.append(model(x.permute(0, 3, 1, 2).float() / 255.0).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def fid(generated_features: np.ndarray, truth_features: np.ndarray) -> float:
    return frechet_of_features(generated_features, truth_features)
