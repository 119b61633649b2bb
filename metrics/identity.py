"""CSIM and ACD from ArcFace embeddings of 112 px aligned faces (:mod:`models.arcface`).

- Alignment: ArcFace expects the face warped so that its 5 landmarks sit on the 112 px
  template. The faces stage stores the per-frame landmarks and the source→crop map of every
  crop; the caller turns them into crop→112 similarity maps (the faces stage's own
  alignment code with the template at 112 px) and :func:`aligned_faces` warps generated and
  ground-truth crops with the **same** map (the generated frame lives in the crop's pixel
  space). :func:`centre_squares` is the fallback when a clip has no landmarks: the square
  ``crop / (1 + margin)`` around the crop centre, which is exactly the template square for
  ``faces.align: landmarks`` crops and an unrolled approximation for ``box`` crops.
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


def aligned_faces(frames: np.ndarray, affines: np.ndarray) -> np.ndarray:
    """``(N, S, S, 3)`` crops warped by per-frame ``(N, 2, 3)`` crop→112 maps."""
    return np.stack(
        [
            cv2.warpAffine(np.ascontiguousarray(f), m, (INPUT_PX, INPUT_PX),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            for f, m in zip(frames, affines, strict=True)
        ]
    )  # fmt: skip


def centre_squares(crops: np.ndarray, margin: float) -> np.ndarray:
    """``(N, S, S, 3)`` crops → the ``S / (1 + margin)`` centre square at 112 px."""
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


def acd(embeddings: np.ndarray, block: int = 1024) -> float:
    """Mean pairwise L2 distance between the unit embeddings of a clip's frames (computed
    in row blocks, so a long clip never holds an ``N × N`` matrix)."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    total = 0.0
    for lo in range(0, n, block):
        gram = np.clip(embeddings[lo : lo + block] @ embeddings.T, -1.0, 1.0)
        dist = np.sqrt(np.maximum(2.0 - 2.0 * gram, 0.0))
        rows = np.arange(lo, lo + len(gram))[:, None]
        total += float(dist[rows < np.arange(n)[None, :]].sum())  # pairs i < j
    return total / (n * (n - 1) / 2)


def acd_curve(embeddings: np.ndarray) -> dict[int, float]:
    """ACD of the first ``n`` frames for each curve length the clip reaches."""
    return {n: acd(embeddings[:n]) for n in CURVE_LENGTHS if len(embeddings) >= n}
