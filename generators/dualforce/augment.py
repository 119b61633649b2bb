"""§8.5 training augmentations as pure functions of a clip window, each with its probability
in :class:`~generators.dualforce.config.AugmentConfig`.

A :class:`ClipWindow` is a window of one clip from the feature cache: VAE latents
``(T, C, h, w)``, LivePortrait motion ``(T, 133)`` (:data:`models.liveportrait.MOTION_LAYOUT`),
EMOCA FLAME ``(T, 159)`` (:data:`models.emoca.FLAME_LAYOUT`), HuBERT ``(T, 2, D)``, the clip's
DINOv2 reference patch tokens ``(N, D)`` and the reference frame's latent ``(C, h, w)``.
Every function returns a new record and leaves its input untouched.

Trade-offs, stated: the cache holds VAE latents, not pixels, so colour jitter is applied in
latent space (a per-channel gain and offset of ``strength`` × the channel's std, which is how
brightness/contrast/colour shifts move the VAE's latent channels, approximately; the
reference latent gets the same jitter, it is a frame of the same video) and the horizontal
flip mirrors the latent grid (the convolutional VAE is close to, not exactly,
flip-equivariant); the DINOv2 patch grid is mirrored column-wise (the tokens themselves are
not flip-equivariant, so this is approximate too). The random reference frame and the
background-noise audio (:mod:`generators.dualforce.audio_noise`) are drawn by
:mod:`generators.dualforce.data`, which sees the whole clip.

Structure flip (x → −x in the image): LivePortrait keypoints and expression offsets negate
their x coordinate, yaw and roll negate, pitch stays, translation tx negates; FLAME's
axis-angle rotations (global and jaw) keep x and negate y and z (a mirror ``M`` maps a
rotation ``R`` to ``MRM``, i.e. axis-angle ``ω`` to ``−Mω``), the weak-perspective camera's tx
negates. Implicit keypoints and FLAME shape/expression bases have no published left/right
correspondence, so no keypoint permutation is applied; the map is still an involution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from generators.dualforce.config import AugmentConfig
from models.emoca import FLAME_SLICES
from models.liveportrait import NUM_KP, motion_slices


@dataclass(frozen=True)
class ClipWindow:
    latents: torch.Tensor  # (T, C, h, w)
    motion: torch.Tensor  # (T, 133)
    flame: torch.Tensor  # (T, 159)
    hubert: torch.Tensor  # (T, 2, D)
    reference_tokens: torch.Tensor  # (N, D) DINOv2 patch tokens, row-major square grid
    reference_latent: torch.Tensor  # (C, h, w)

    @property
    def num_frames(self) -> int:
        return self.latents.shape[0]


def flip_motion(motion: torch.Tensor) -> torch.Tensor:
    """Mirror LivePortrait motion ``(..., 133)`` for a horizontally flipped image."""
    sl = motion_slices()
    out = motion.clone()
    for name in ("kp", "exp"):
        xyz = out[..., sl[name]].unflatten(-1, (NUM_KP, 3))
        xyz[..., 0] = -xyz[..., 0]
        out[..., sl[name]] = xyz.flatten(-2)
    for name in ("yaw", "roll"):
        out[..., sl[name]] = -out[..., sl[name]]
    out[..., sl["t"].start] = -out[..., sl["t"].start]
    return out


def flip_flame(flame: torch.Tensor) -> torch.Tensor:
    """Mirror EMOCA FLAME ``(..., 159)``: pose = global + jaw axis-angle, cam = (s, tx, ty)."""
    out = flame.clone()
    pose = FLAME_SLICES["pose"]
    for start in (pose.start, pose.start + 3):
        out[..., start + 1 : start + 3] = -out[..., start + 1 : start + 3]
    cam = FLAME_SLICES["cam"]
    out[..., cam.start + 1] = -out[..., cam.start + 1]
    return out


def flip_token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Mirror a row-major square grid of tokens ``(N, D)`` left-right."""
    side = round(tokens.shape[0] ** 0.5)
    return tokens.reshape(side, side, -1).flip(1).reshape(tokens.shape)


def horizontal_flip(clip: ClipWindow) -> ClipWindow:
    """The window as seen in a mirror: latents, structure, FLAME and both references."""
    return replace(
        clip,
        latents=clip.latents.flip(-1),
        motion=flip_motion(clip.motion),
        flame=flip_flame(clip.flame),
        reference_tokens=flip_token_grid(clip.reference_tokens),
        reference_latent=clip.reference_latent.flip(-1),
    )


def temporal_crop(clip: ClipWindow, start: int, length: int) -> ClipWindow:
    """Frames ``start : start + length`` of every per-frame stream."""
    if not (start >= 0 and length >= 1 and start + length <= clip.num_frames):
        raise ValueError(f"crop {start}+{length} outside a {clip.num_frames}-frame clip")
    s = slice(start, start + length)
    return replace(
        clip, latents=clip.latents[s], motion=clip.motion[s], flame=clip.flame[s],
        hubert=clip.hubert[s],
    )  # fmt: skip


def _resample(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of ``(T, ...)`` along time to ``length`` frames (ends aligned)."""
    flat = x.reshape(x.shape[0], -1).T[None].float()
    out = F.interpolate(flat, size=length, mode="linear", align_corners=True)
    return out[0].T.reshape(length, *x.shape[1:]).to(x.dtype)


def speed_change(clip: ClipWindow, factor: float) -> ClipWindow:
    """Play the window ``factor``× as fast: ``round(T / factor)`` frames, every stream
    resampled on the same time axis (HuBERT on its 50 Hz step axis)."""
    t = clip.num_frames
    length = max(1, round(t / factor))
    steps = clip.hubert.shape[1]
    hub = _resample(clip.hubert.reshape(t * steps, -1), length * steps)
    return replace(
        clip,
        latents=_resample(clip.latents, length),
        motion=_resample(clip.motion, length),
        flame=_resample(clip.flame, length),
        hubert=hub.reshape(length, steps, -1),
    )


def color_jitter(latents: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-channel ``x·(1 + gain) + offset·std_c`` on ``(..., C, h, w)``, gain/offset ``(C,)``,
    ``std_c`` the channel's std over everything else."""
    dims = tuple(d for d in range(latents.dim()) if d != latents.dim() - 3)
    std = latents.float().std(dim=dims, keepdim=True)
    shape = (-1, 1, 1)
    return (latents * (1 + gain.view(shape)) + offset.view(shape) * std).to(latents.dtype)


def augment(clip: ClipWindow, cfg: AugmentConfig, rng: np.random.Generator) -> ClipWindow:
    """Apply §8.5's feature-space augmentations, each with its probability, in order:
    temporal crop, speed change, colour jitter, horizontal flip."""
    if rng.random() < cfg.p_temporal_crop and clip.num_frames > cfg.min_crop_frames:
        length = int(rng.integers(cfg.min_crop_frames, clip.num_frames + 1))
        clip = temporal_crop(clip, int(rng.integers(0, clip.num_frames - length + 1)), length)
    if rng.random() < cfg.p_speed:
        clip = speed_change(clip, float(rng.uniform(*cfg.speed_range)))
    if rng.random() < cfg.p_color:
        c = clip.latents.shape[1]
        gain = torch.from_numpy(rng.uniform(-1, 1, c) * cfg.color_strength).float()
        offset = torch.from_numpy(rng.uniform(-1, 1, c) * cfg.color_strength).float()
        both = torch.cat([clip.latents, clip.reference_latent[None]])
        jittered = color_jitter(both, gain, offset)
        clip = replace(clip, latents=jittered[:-1], reference_latent=jittered[-1])
    if rng.random() < cfg.p_flip:
        clip = horizontal_flip(clip)
    return clip
