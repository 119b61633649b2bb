"""Per-frame video features from the face crops, all from one streamed decode.

The faces stage's ``crops.mp4`` is decoded once, in chunks of ``batch_size`` frames, and
every chunk goes through each enabled extractor before the next is decoded:

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
(downscaling) or bicubic (upscaling), on the CPU, while the models run on the worker's
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.dinov2 import Dinov2Encoder, embed_reference, load_dinov2
from models.emoca import FLAME_DIM, extract_flame, load_emoca
from models.liveportrait import INPUT_SIZE as MOTION_SIZE
from models.liveportrait import MOTION_DIM, extract_motion, load_motion_extractor
from models.registry import ModelSpec, ensure_model
from models.vae import encode_frames, latent_stride
from tasks.base import FailureKind, ItemFailure
from tasks.media import iter_frames, probe

EMOCA_SIZE = 224


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


@dataclass
class VideoExtractors:
    """The loaded video models of one worker (``None`` = family disabled)."""

    vae: torch.nn.Module
    motion: torch.nn.Module | None
    flame: torch.nn.Module | None
    reference: Dinov2Encoder | None
    emoca_crop_fraction: float

    @classmethod
    def load(
        cls,
        vae: torch.nn.Module,
        motion_spec: ModelSpec | None,
        flame_spec: ModelSpec | None,
        reference_spec: ModelSpec | None,
        data_root: Path,
        device: torch.device,
        emoca_crop_fraction: float,
    ) -> VideoExtractors:
        motion = flame = reference = None
        if motion_spec is not None:
            path = ensure_model(motion_spec, data_root)
            motion = load_motion_extractor(path or motion_spec.source, device=device)
        if flame_spec is not None:
            path = ensure_model(flame_spec, data_root)
            flame = load_emoca(path or flame_spec.source, device=device)
        if reference_spec is not None:
            path = ensure_model(reference_spec, data_root)
            reference = load_dinov2(
                path or reference_spec.source,
                reference_spec.subfolder,
                device,
                reference_spec.revision,
            )
        return cls(vae, motion, flame, reference, emoca_crop_fraction)

    def run(
        self, crops: Path, batch_size: int, reference_index: int = 0
    ) -> dict[str, torch.Tensor]:
        """Decode ``crops`` once; every enabled family's per-frame tensor, float32, CPU.

        With a reference model, ``reference_cls`` / ``reference_patch_tokens`` /
        ``reference_image`` (uint8) come from frame ``reference_index`` (clamped).
        """
        info = probe(crops)
        stride = latent_stride(self.vae)
        if info.width % stride or info.height % stride:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"crop size {info.width}x{info.height} is not a multiple of {stride}",
            )
        parts: dict[str, list[torch.Tensor]] = {"vae_latents": []}
        if self.motion is not None:
            parts["liveportrait_motion"] = []
        if self.flame is not None:
            parts["emoca_flame"] = []
        seen, reference_frame = 0, None
        for frames in iter_frames(crops, info.width, info.height, chunk=batch_size):
            if seen <= reference_index < seen + len(frames) or reference_frame is None:
                reference_frame = frames[min(reference_index - seen, len(frames) - 1)].copy()
            seen += len(frames)
            parts["vae_latents"].append(encode_frames(self.vae, frames, batch_size).float())
            if self.motion is not None:
                x = resize_frames(frames, MOTION_SIZE)
                motion = extract_motion(self.motion, x, batch_size)
                parts["liveportrait_motion"].append(torch.from_numpy(motion))
            if self.flame is not None:
                x = resize_frames(frames, EMOCA_SIZE, self.emoca_crop_fraction)
                parts["emoca_flame"].append(
                    torch.from_numpy(extract_flame(self.flame, x, batch_size))
                )
        if not parts["vae_latents"]:
            raise ItemFailure(FailureKind.FORMAT, f"{crops.name}: no decodable frames")
        out = {family: torch.cat(chunks) for family, chunks in parts.items()}
        if self.reference is not None and reference_frame is not None:
            emb = embed_reference(self.reference, reference_frame)
            out["reference_cls"] = emb["cls"]
            out["reference_patch_tokens"] = emb["patch_tokens"]
            out["reference_image"] = torch.from_numpy(reference_frame)
        dims = {"liveportrait_motion": MOTION_DIM, "emoca_flame": FLAME_DIM}
        for family, dim in dims.items():
            if family in out and out[family].shape[1:] != (dim,):
                raise ItemFailure(FailureKind.MODEL, f"{family} gave {tuple(out[family].shape)}")
        return out
