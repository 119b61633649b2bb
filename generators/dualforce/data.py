"""Training data of the ``dualforce`` family: clips in memory, windows, augmentation, batches.

One training sample is a window of ``clip_frames`` consecutive frames of one clip (the
seed's 32-frame clips from the feature cache): VAE latents, LivePortrait motion, EMOCA FLAME,
HuBERT (with ``p_noise`` the clip's background-noise version,
:mod:`generators.dualforce.audio_noise`), the clip's DINOv2 reference tokens and a reference
frame's latent (frame 0, the one generation uses by default, or with ``p_random_reference``
a uniform frame of the clip). §8.5's other augmentations follow
(:func:`generators.dualforce.augment.augment`). A clip is drawn
with probability proportional to ``sampling_weight × num_frames`` (the quality stage's
soft-rule weight; long clips hold more windows).

**Determinism and resume.** Everything random about row ``r`` of step ``s`` — clip, window,
augmentations, σ_v, σ_s, the noises, audio dropout, lip-sync shifts — comes from a generator
seeded by ``(seed, s, r)`` alone, so ranks slice one global batch and a resumed run sees
exactly the batches (and losses) an uninterrupted run would.

**Lengths.** Windows shorter than ``clip_frames`` (short clips, temporal crop, speed change)
are padded at the end with zeros and marked in ``valid``; a speed-up that makes a window
longer is cut back to ``clip_frames``. The model is causal, so the padding never reaches a
valid frame.

**Memory.** Clips are held in memory (latents fp16): right for the sizes trained here; a
large corpus would stream windows from the safetensors files instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from generators.dualforce.audio_noise import noisy_hubert
from generators.dualforce.augment import ClipWindow, augment, temporal_crop
from generators.dualforce.config import DualForceConfig, DualForceSpec
from generators.dualforce.objectives import sample_sigmas
from generators.dualforce.structure import column_statistics
from generators.family_config import FeatureClip
from generators.io import read_tensor

LATENTS, AUDIO, MOTION, FLAME, REFERENCE = (
    "vae_latents", "hubert", "liveportrait_motion", "emoca_flame", "reference",
)  # fmt: skip
TENSOR_NAMES = {
    LATENTS: "latents",
    AUDIO: "features",
    MOTION: "motion",
    FLAME: "flame",
    REFERENCE: "patch_tokens",
}
PER_CLIP = frozenset({REFERENCE})  # no frame axis


@dataclass
class ClipTensors:
    clip_id: str
    latents: torch.Tensor  # (T, C, h, w) fp16
    motion: torch.Tensor  # (T, 133)
    flame: torch.Tensor  # (T, 159)
    hubert: torch.Tensor  # (T, 2, D)
    reference: torch.Tensor  # (N, D)
    weight: float
    hubert_noisy: torch.Tensor | None = None  # (T, 2, D) of the wav plus background noise

    @property
    def num_frames(self) -> int:
        return int(self.latents.shape[0])


def clip_tensors(clip_id: str, tensors: dict[str, torch.Tensor], weight: float) -> ClipTensors:
    """One clip's tensors, checked against each other; ``ValueError`` when they disagree."""
    per_frame = {f: int(t.shape[0]) for f, t in tensors.items() if f not in PER_CLIP}
    if len(set(per_frame.values())) != 1 or 0 in per_frame.values():
        raise ValueError(f"{clip_id}: features disagree on frames {per_frame}")
    return ClipTensors(
        clip_id,
        tensors[LATENTS].to(torch.float16),
        tensors[MOTION].float(),
        tensors[FLAME].float(),
        tensors[AUDIO].float(),
        tensors[REFERENCE].float(),
        weight,
    )


@dataclass
class TrainingData:
    spec: DualForceSpec
    clips: list[ClipTensors]
    probabilities: np.ndarray  # per clip
    motion_stats: torch.Tensor  # (2, 133) mean, std over all training frames
    flame_stats: torch.Tensor  # (2, 159)


def load_clips(spec: DualForceSpec, cfg: DualForceConfig, clips: list[FeatureClip]) -> TrainingData:
    """Read every clip's features (and, in stage 3 with ``p_noise > 0``, compute its noisy
    HuBERT; stages 1 and 2 read no audio); the clip-drawing probabilities and column
    statistics."""
    if not clips:
        raise ValueError("dualforce: no training clips")
    loaded = []
    for clip in clips:
        tensors = {f: read_tensor(clip.paths[f], name) for f, name in TENSOR_NAMES.items()}
        one = clip_tensors(clip.clip_id, tensors, clip.sampling_weight)
        if cfg.augment.p_noise > 0 and spec.training_stage == "stage3":
            if clip.audio_path is None:
                raise ValueError(f"{clip.clip_id}: augment.p_noise > 0 needs the clip's wav")
            one.hubert_noisy = noisy_hubert(
                clip.clip_id, clip.paths[AUDIO], clip.audio_path, one.num_frames,
                cfg.augment.noise_snr_db,
            )  # fmt: skip
        loaded.append(one)
    mass = np.array([c.weight * c.num_frames for c in loaded], dtype=np.float64)
    if not mass.sum() > 0:
        raise ValueError("dualforce: every training clip has sampling weight 0")
    return TrainingData(
        spec,
        loaded,
        mass / mass.sum(),
        column_statistics(torch.cat([c.motion for c in loaded])),
        column_statistics(torch.cat([c.flame for c in loaded])),
    )


def draw_window(data: TrainingData, cfg: DualForceConfig, rng: np.random.Generator) -> ClipWindow:
    """A clip, a window of up to ``clip_frames`` frames, a reference frame, augmentations."""
    clip = data.clips[int(rng.choice(len(data.clips), p=data.probabilities))]
    length = min(cfg.clip_frames, clip.num_frames)
    start = int(rng.integers(0, clip.num_frames - length + 1))
    ref = 0
    if rng.random() < cfg.augment.p_random_reference:
        ref = int(rng.integers(0, clip.num_frames))
    hubert = clip.hubert
    if rng.random() < cfg.augment.p_noise and clip.hubert_noisy is not None:
        hubert = clip.hubert_noisy
    s = slice(start, start + length)
    window = ClipWindow(
        clip.latents[s].float(), clip.motion[s], clip.flame[s], hubert[s], clip.reference,
        clip.latents[ref].float(),
    )  # fmt: skip
    window = augment(window, cfg.augment, rng)
    if window.num_frames > cfg.clip_frames:
        window = temporal_crop(window, 0, cfg.clip_frames)
    return window


def _pad(x: torch.Tensor, frames: int) -> torch.Tensor:
    out = x.new_zeros(frames, *x.shape[1:])
    out[: x.shape[0]] = x
    return out


def lip_shifts(length: int, cfg: DualForceConfig, rng: np.random.Generator) -> np.ndarray:
    """``lip_negatives`` shifts in ``[lip_min_shift, min(lip_max_shift, length − 1)]``, or all
    −1 when the window is too short for any (its lip-sync term is then left out)."""
    w = cfg.losses
    hi = min(w.lip_max_shift, length - 1)
    if hi < w.lip_min_shift:
        return np.full(w.lip_negatives, -1, dtype=np.int64)
    return rng.integers(w.lip_min_shift, hi + 1, size=w.lip_negatives).astype(np.int64)


def make_row(
    data: TrainingData, cfg: DualForceConfig, seed: int, step: int, row: int
) -> dict[str, torch.Tensor]:
    """Row ``row`` of step ``step``'s global batch (one window plus its noise draws)."""
    rng = np.random.default_rng([seed, step, row])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    window = draw_window(data, cfg, rng)
    t, n = cfg.clip_frames, window.num_frames
    valid = torch.zeros(t)
    valid[:n] = 1.0
    sigma_v, sigma_s = sample_sigmas(1, t, cfg.noise, gen)
    latents = _pad(window.latents, t)
    return {
        "latents": latents,
        "motion": _pad(window.motion, t),
        "flame": _pad(window.flame, t),
        "hubert": _pad(window.hubert, t),
        "reference_tokens": window.reference_tokens,
        "reference_latent": window.reference_latent,
        "valid": valid,
        "sigma_video": sigma_v[0],
        "sigma_struct": sigma_s[0],
        "eps_video": torch.randn(latents.shape, generator=gen),
        "eps_struct": torch.randn(t, data.spec.arch.struct_latent_dim, generator=gen),
        "audio_keep": torch.tensor(float(rng.random() >= cfg.losses.audio_dropout)),
        "lip_shifts": torch.from_numpy(lip_shifts(n, cfg, rng)),
    }


STAGE_KEYS = {
    "stage1": ("motion", "flame", "valid"),
    "stage2": (
        "latents", "reference_tokens", "reference_latent", "valid", "sigma_video", "eps_video",
    ),
    "stage3": None,  # everything
}  # fmt: skip


def make_batch(
    data: TrainingData, cfg: DualForceConfig, seed: int, step: int, start: int, stop: int
) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of step ``step``'s global batch, stacked; the stage's keys only."""
    rows = [make_row(data, cfg, seed, step, r) for r in range(start, stop)]
    keys = STAGE_KEYS[data.spec.training_stage] or tuple(rows[0])
    return {k: torch.stack([r[k] for r in rows]) for k in keys}
