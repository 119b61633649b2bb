"""Per-frame video features: the face crops for the VAE, official framings for the rest.

The faces stage's ``crops.mp4`` is decoded once, in chunks of ``batch_size`` frames, and
every chunk goes to the VAE's pool (:mod:`tasks.pools`; the workers are in
:mod:`tasks.features_workers`). LivePortrait and EMOCA get their own framing instead (see
:mod:`tasks.features_framing`): when either is enabled the clip itself is decoded in step
with the crops and each frame is cut with that extractor's official crop, from the landmarks
the faces stage stored. In-process pools run each chunk before the next is decoded; remote
pools (their own Ray actors, on GPUs) infer while the next chunk decodes:

- ``vae_latents``: the VAE (see :mod:`models.vae`) on the face crop at its own size (the
  training crop the generators learn to inpaint);
- ``liveportrait_motion``: LivePortrait's motion extractor (:mod:`models.liveportrait`) on
  its official 256 px crop (2.3 × the landmark square, moved up 0.125, rotated upright) →
  133 floats per frame (``MOTION_LAYOUT``);
- ``emoca_flame``: the EMOCA encoder (:mod:`models.emoca`) on its official 224 px crop
  (1.1 × 1.25 × the 68-landmark box, axis-aligned) → 159 floats per frame
  (``FLAME_LAYOUT``);
- ``reference``: DINOv2 (:mod:`models.dinov2`) on one reference frame per clip, the
  middle frame (a frame well inside the shot, away from fades and the cut points of the
  annotation), kept with the frame itself for the DualForce reference branch;
- ``masked_latents`` (with ``masked_latents=True``): the VAE on the same crops with their
  lower half blacked out in pixel space, MuseTalk 1.5's masked UNet input (encoded in the
  same worker call as ``vae_latents``).

Cutting the framed crops (bilinear, with an area pre-shrink for large downscales) runs on
the CPU of the stage's worker, while the models run on their pools' devices.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from tasks.base import FailureKind, ItemFailure
from tasks.features_framing import FRAMED_SIZES_PX, cut_crops
from tasks.media import iter_frames, probe
from tasks.pools import ModelPool, PoolTask

# family -> worker method called on every chunk of frames
FRAME_FAMILIES = {
    "vae_latents": "encode",
    "liveportrait_motion": "extract",
    "emoca_flame": "extract",
}


class _FrameSource:
    """The clip's frames in step with the crops: ``take(n)`` returns the next ``n``."""

    def __init__(self, video: Path, chunk_frames: int):
        info = probe(video)
        self._chunks = iter_frames(video, info.width, info.height, chunk=chunk_frames)
        self._buffer: list[np.ndarray] = []
        self._video = video

    def take(self, n: int) -> np.ndarray:
        while sum(len(b) for b in self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ItemFailure(
                    FailureKind.MISALIGNED, f"{self._video.name} has fewer frames than the crops"
                )
            self._buffer.append(chunk)
        frames = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer = [frames[n:]] if len(frames) > n else []
        return frames[:n]

    def close(self) -> None:
        self._chunks.close()


def extract_video(
    crops: Path,
    pools: dict[str, ModelPool],
    latent_stride: int,
    chunk_frames: int,
    reference_index: int = 0,
    max_inflight_chunks: int = 4,
    clip: Path | None = None,
    framing: dict[str, np.ndarray] | None = None,
    masked_latents: bool = False,
) -> dict[str, np.ndarray]:
    """Decode ``crops`` (and ``clip``, for the framed extractors) once; run every video pool
    present on each chunk.

    ``pools`` holds ``vae_latents`` (required) and optionally ``liveportrait_motion``,
    ``emoca_flame`` and ``reference``; crops must be a multiple of ``latent_stride`` (the
    VAE's). ``framing`` gives, per framed extractor in ``pools``, one source→crop affine
    per frame of ``clip`` (see :func:`tasks.features_framing.framing_affines`). Each chunk
    of crops is submitted to the VAE; the same frames of the clip are cut into each framed
    extractor's crop and submitted to it. With remote pools the next
    chunk decodes while they infer, and at most ``max_inflight_chunks`` chunks are
    outstanding (memory stays bounded). The reference pool gets crop frame
    ``reference_index`` (clamped to the clip). With ``masked_latents`` the VAE also encodes
    every crop with rows ``H//2:`` set to black (:func:`models.vae.mask_lower_half`),
    returned as ``masked_latents``. Returns float32 arrays per family
    (``reference_cls`` / ``reference_patch_tokens`` / ``reference_image`` for the
    reference), in frame order.
    """
    info = probe(crops)
    if info.width % latent_stride or info.height % latent_stride:
        raise ItemFailure(
            FailureKind.FORMAT,
            f"crop size {info.width}x{info.height} is not a multiple of {latent_stride}",
        )
    framed = {f: m for f, m in (framing or {}).items() if f in pools and f in FRAMED_SIZES_PX}
    if set(pools) & set(FRAMED_SIZES_PX) - set(framed) or (framed and clip is None):
        raise ValueError("the framed extractors need the clip and their framing affines")
    parts: dict[str, list[np.ndarray]] = {f: [] for f in FRAME_FAMILIES if f in pools}
    if masked_latents:
        parts["masked_latents"] = []
    inflight: deque[dict[str, PoolTask]] = deque()

    def collect_oldest() -> None:
        for family, task in inflight.popleft().items():
            result = task.result()
            if family == "vae_latents" and masked_latents:  # (2, N, ...): plain, masked
                parts["masked_latents"].append(result[1])
                result = result[0]
            parts[family].append(result)

    source = _FrameSource(clip, chunk_frames) if framed and clip is not None else None
    seen, reference_frame = 0, None
    try:
        for frames in iter_frames(crops, info.width, info.height, chunk=chunk_frames):
            if seen <= reference_index < seen + len(frames) or reference_frame is None:
                reference_frame = frames[min(reference_index - seen, len(frames) - 1)].copy()
            encode = "encode_with_masked" if masked_latents else "encode"
            tasks = {"vae_latents": pools["vae_latents"].submit(encode, frames)}
            if source is not None:
                full = source.take(len(frames))
                for family, affines in framed.items():
                    window = affines[seen : seen + len(frames)]
                    if len(window) < len(frames):
                        raise ItemFailure(
                            FailureKind.MISALIGNED,
                            f"the face track has {len(affines)} frames, the crops more",
                        )
                    cut = cut_crops(full, window, FRAMED_SIZES_PX[family])
                    tasks[family] = pools[family].submit(FRAME_FAMILIES[family], cut)
            seen += len(frames)
            inflight.append(tasks)
            if len(inflight) >= max_inflight_chunks:
                collect_oldest()
        while inflight:
            collect_oldest()
    finally:
        if source is not None:
            source.close()
    if not parts["vae_latents"]:
        raise ItemFailure(FailureKind.FORMAT, f"{crops.name}: no decodable frames")
    out = {family: np.concatenate(chunks) for family, chunks in parts.items()}
    if "reference" in pools and reference_frame is not None:
        emb = pools["reference"].submit("embed", reference_frame).result()
        out["reference_cls"] = emb["cls"]
        out["reference_patch_tokens"] = emb["patch_tokens"]
        out["reference_image"] = reference_frame
    return out
