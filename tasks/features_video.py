"""Per-frame video features from the face crops, all from one streamed decode.

The faces stage's ``crops.mp4`` is decoded once, in chunks of ``batch_size`` frames, and
every chunk is submitted to each enabled extractor's pool (:mod:`tasks.pools`; the
workers are in :mod:`tasks.features_workers`). In-process pools run each chunk before the
next is decoded; remote pools (their own Ray actors, on GPUs) infer while the next chunk
decodes:

- ``vae_latents``: the VAE (see :mod:`models.vae`) on the crop at its own size;
- ``liveportrait_motion``: LivePortrait's motion extractor (:mod:`models.liveportrait`) on
  the crop resized to 256×256 → 133 floats per frame (``MOTION_LAYOUT``);
- ``emoca_flame``: the EMOCA encoder (:mod:`models.emoca`) on the central
  ``emoca_crop_fraction`` of the crop resized to 224×224 → 159 floats per frame
  (``FLAME_LAYOUT``);
- ``reference``: DINOv2 (:mod:`models.dinov2`) on one reference frame per clip, the
  middle frame (a frame well inside the shot, away from fades and the cut points of the
  annotation), kept with the frame itself for the DualForce reference branch.

Crop geometry is a trade-off, recorded in each file's metadata: the faces stage cuts
a square of ``(1 + margin)`` × the face box (1.5 by default). EMOCA was trained on
about 1.25 × a landmark box, so its input is the central 1.25 / 1.5 ≈ 0.83 of the crop.
LivePortrait's own cropper frames the face more loosely (about 2.3 × the face); pixels
outside our crop do not exist, so motion is computed on the whole crop, and ops who need
LivePortrait's framing raise ``faces.margin``. Resizing uses OpenCV's area filter
(downscaling) or bicubic (upscaling), on the CPU of the extractor's worker, while the
models run on that worker's device.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import cv2
import numpy as np

from tasks.base import FailureKind, ItemFailure
from tasks.media import iter_frames, probe
from tasks.pools import ModelPool, PoolTask

EMOCA_SIZE = 224
# family -> worker method called on every chunk of decoded crop frames
FRAME_FAMILIES = {
    "vae_latents": "encode",
    "liveportrait_motion": "extract",
    "emoca_flame": "extract",
}


def resize_frames(frames: np.ndarray, size_px: int, center_fraction: float = 1.0) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 → ``(N, size, size, 3)``: central square ``fraction``, resized."""
    n, h, w, _ = frames.shape
    side = max(1, round(min(h, w) * center_fraction))
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = frames[:, y0 : y0 + side, x0 : x0 + side]
    if side == size_px:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if side > size_px else cv2.INTER_CUBIC
    out = np.empty((n, size_px, size_px, 3), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(crop[i], (size_px, size_px), interpolation=interp)
    return out


def extract_video(
    crops: Path,
    pools: dict[str, ModelPool],
    latent_stride: int,
    chunk_frames: int,
    reference_index: int = 0,
    max_inflight_chunks: int = 4,
) -> dict[str, np.ndarray]:
    """Decode ``crops`` once and run every video pool present on each chunk.

    ``pools`` holds ``vae_latents`` (required) and optionally ``liveportrait_motion``,
    ``emoca_flame`` and ``reference``; crops must be a multiple of ``latent_stride`` (the
    VAE's). Each chunk is shared once and submitted to every frame pool; with remote pools
    the next chunk decodes while they infer, and at most ``max_inflight_chunks`` chunks are
    outstanding (memory stays bounded). The reference pool gets frame ``reference_index``
    (clamped to the clip). Returns float32 arrays per family (``reference_cls`` /
    ``reference_patch_tokens`` / ``reference_image`` for the reference), in frame order.
    """
    info = probe(crops)
    if info.width % latent_stride or info.height % latent_stride:
        raise ItemFailure(
            FailureKind.FORMAT,
            f"crop size {info.width}x{info.height} is not a multiple of {latent_stride}",
        )
    frame_pools = {
        family: (pools[family], method)
        for family, method in FRAME_FAMILIES.items()
        if family in pools
    }
    parts: dict[str, list[np.ndarray]] = {family: [] for family in frame_pools}
    inflight: deque[dict[str, PoolTask]] = deque()

    def collect_oldest() -> None:
        for family, task in inflight.popleft().items():
            parts[family].append(task.result())

    seen, reference_frame = 0, None
    for frames in iter_frames(crops, info.width, info.height, chunk=chunk_frames):
        if seen <= reference_index < seen + len(frames) or reference_frame is None:
            reference_frame = frames[min(reference_index - seen, len(frames) - 1)].copy()
        seen += len(frames)
        shared = pools["vae_latents"].share(frames)
        inflight.append(
            {family: pool.submit(method, shared) for family, (pool, method) in frame_pools.items()}
        )
        if len(inflight) >= max_inflight_chunks:
            collect_oldest()
    while inflight:
        collect_oldest()
    if not parts["vae_latents"]:
        raise ItemFailure(FailureKind.FORMAT, f"{crops.name}: no decodable frames")
    out = {family: np.concatenate(chunks) for family, chunks in parts.items()}
    if "reference" in pools and reference_frame is not None:
        emb = pools["reference"].submit("embed", reference_frame).result()
        out["reference_cls"] = emb["cls"]
        out["reference_patch_tokens"] = emb["patch_tokens"]
        out["reference_image"] = reference_frame
    return out
