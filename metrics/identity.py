"""CSIM and ACD from ArcFace embeddings of 112 px aligned faces (:mod:`models.arcface`).

- :func:`aligned_faces`: the 112×112 ArcFace square inside a faces-stage crop. With
  ``faces.align: landmarks`` the crop maps the 5 landmarks onto the ArcFace template scaled
  so that its 112 px square fills ``crop_px / (1 + margin)`` around the crop centre; that
  square, resized to 112 px, is the aligned face (in ``box`` mode it is a centred square,
  unaligned in roll).
- **CSIM**: mean over frames of the cosine similarity between the generated frame's
  embedding and the reference identity: the paired ground-truth frame's embedding (so the
  ground truth scores exactly 1, as in MuseTalk's table), or one reference embedding for
  every frame.
- **ACD** (average content distance, MoCoGAN): mean Euclidean distance between the unit
  embeddings of all pairs of frames of one clip: 0 for a constant identity, larger when the
  identity drifts. :func:`acd_curve` gives it over the first 32 / 128 / 256 / 512 frames.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from models.arcface import INPUT_PX, IResNet, arcface_input

CURVE_LENGTHS = (32, 128, 256, 512)


def aligned_faces(crops: np.ndarray, margin: float) -> np.ndarray:
    """``(N, S, S, 3)`` face crops → ``(N, 112, 112, 3)`` ArcFace squares (see module doc)."""
    size = crops.shape[1]
    side = size / (1.0 + margin)
    lo = round((size - side) / 2)
    hi = max(lo + 1, round((size + side) / 2))
    square = crops[:, lo:hi, lo:hi]
    interp = cv2.INTER_AREA if square.shape[1] > INPUT_PX else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (INPUT_PX, INPUT_PX), interpolation=interp) for f in square])


@torch.inference_mode()
def embed(model: IResNet, faces: np.ndarray, batch: int = 32) -> np.ndarray:
    """Unit-norm ``(N, 512)`` embeddings of ``(N, 112, 112, 3)`` uint8 RGB faces."""
    device = next(model.parameters()).device
    out = [
        model(arcface_input(faces[i : i + batch]).to(device)).double().cpu().numpy()
        for i in range(0, len(faces), batch)
    ]
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def identity_reference(embeddings: np.ndarray) -> np.ndarray:
    m = embeddings.mean(axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def csim(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine of unit embeddings ``(N, D)`` with paired ``(N, D)`` or one ``(D,)``."""
    n = len(generated) if reference.ndim == 1 else min(len(generated), len(reference))
    ref = reference if reference.ndim == 1 else reference[:n]
    return float(np.mean(np.sum(generated[:n] * ref, axis=-1)))


def acd(embeddings: np.ndarray) -> float:
    """Mean pairwise L2 distance between the unit embeddings of a clip's frames."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    gram = np.clip(embeddings @ embeddings.T, -1.0, 1.0)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * gram, 0.0))
    return float(dist[np.triu_indices(n, 1)].mean())


def acd_curve(embeddings: np.ndarray) -> dict[int, float]:
    """ACD of the first ``n`` frames for each curve length the clip reaches."""
    return {n: acd(embeddings[:n]) for n in CURVE_LENGTHS if len(embeddings) >= n}
