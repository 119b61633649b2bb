"""Training and sampling data of the ``musetalk15`` family: clips in memory, sampling, batches.

One sample is one frame ``t`` of one training clip:

- target: the frame's own VAE latents ``(C, h, w)`` (the loss is MSE in latent space);
- input: the target with its lower half zeroed, reference latents from another frame
  ``r`` of the same clip with ``|r - t| > MIN_REF_GAP_FRAMES`` (MuseTalk rejects closer ones
  so the mouth cannot be copied), and the Engram prior for the clip's audio codes;
- audio: the HuBERT window of frames ``t-w .. t+w`` (see
  :func:`generators.musetalk15.model.audio_window_tokens`).

**Determinism and resume.** The frames of step ``s`` are drawn from a generator seeded by
``(seed, s)`` alone, and each rank takes its slice of that global batch, so a resumed run
sees exactly the batches an uninterrupted run would.

**Memory.** Clips are held in memory (latents fp16, HuBERT, and the Engram prior, about
1.5 × the latents): right for the small models trained here; a large corpus would stream
from the safetensors files instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from generators.blocks.engram_hash import assign_codes, lookup, read_bank
from generators.family_config import FeatureClip
from generators.io import read_tensor
from generators.musetalk15.model import audio_window_tokens, unet_input

MIN_REF_GAP_FRAMES = 5
LATENTS, AUDIO = "vae_latents", "hubert"
TENSOR_NAMES = {LATENTS: "latents", AUDIO: "features"}


def engram_prior(bank: dict[str, torch.Tensor], hubert: torch.Tensor) -> torch.Tensor:
    """The bank's retrieved mouth prior ``(T, C, h_mouth, w)`` for a clip's own audio codes."""
    codes = assign_codes(bank["codebook"], hubert.float().numpy())
    return lookup(bank, codes).float()


@dataclass
class ClipTensors:
    clip_id: str
    latents: torch.Tensor  # (T, C, h, w) fp16
    hubert: torch.Tensor  # (T, S, D)
    prior: torch.Tensor  # (T, C, h_mouth, w) fp16

    @property
    def num_frames(self) -> int:
        return int(self.latents.shape[0])


def clip_tensors(
    clip_id: str, latents: torch.Tensor, hubert: torch.Tensor, bank: dict[str, torch.Tensor]
) -> ClipTensors:
    """One clip's tensors with its Engram prior; ``ValueError`` when they do not fit together."""
    if latents.shape[0] != hubert.shape[0]:
        raise ValueError(f"{clip_id}: {latents.shape[0]} latent vs {hubert.shape[0]} audio")
    prior = engram_prior(bank, hubert)
    want = latents.shape[2] - latents.shape[2] // 2
    if prior.shape[1] != latents.shape[1] or prior.shape[2] != want:
        raise ValueError(
            f"{clip_id}: bank prior {tuple(prior.shape[1:])} does not fit latents "
            f"{tuple(latents.shape[1:])}; was the bank built from the same VAE?"
        )
    return ClipTensors(clip_id, latents, hubert, prior)


def load_clips(clips: list[FeatureClip], bank_path: str) -> list[ClipTensors]:
    """Read every clip's latents and HuBERT features and compute its Engram prior."""
    bank = read_bank(bank_path)
    out: list[ClipTensors] = []
    for clip in clips:
        lat = read_tensor(clip.paths[LATENTS], TENSOR_NAMES[LATENTS]).to(torch.float16)
        hub = read_tensor(clip.paths[AUDIO], TENSOR_NAMES[AUDIO])
        tensors = clip_tensors(clip.clip_id, lat, hub, bank)
        tensors.prior = tensors.prior.to(torch.float16)
        out.append(tensors)
    return out


def reference_frame(t: int, num_frames: int, u: float) -> int:
    """A frame ``r`` with ``|r - t| > MIN_REF_GAP_FRAMES`` chosen by ``u ∈ [0, 1)``.

    Uniform over the allowed frames; a clip too short to have any falls back to the
    farther end of the clip.
    """
    gap = MIN_REF_GAP_FRAMES
    allowed = [r for r in (range(0, t - gap), range(t + gap + 1, num_frames)) if len(r)]
    total = sum(len(r) for r in allowed)
    if total == 0:
        return 0 if t >= num_frames - 1 - t else num_frames - 1
    k = min(int(u * total), total - 1)
    for r in allowed:
        if k < len(r):
            return r[k]
        k -= len(r)
    raise AssertionError("unreachable")


def step_picks(
    frame_counts: list[int], seed: int, step: int, global_batch: int
) -> list[tuple[int, int, int]]:
    """``(clip, frame, reference)`` triples of one step's global batch, from ``(seed, step)``.

    Frames are uniform over all frames of all clips (long clips count more).
    """
    rng = np.random.default_rng([seed, step])
    offsets = np.cumsum([0, *frame_counts])
    flat = rng.integers(0, offsets[-1], size=global_batch)
    us = rng.random(global_batch)
    picks = []
    for f, u in zip(flat.tolist(), us.tolist(), strict=True):
        clip = int(np.searchsorted(offsets, f, side="right") - 1)
        t = f - int(offsets[clip])
        picks.append((clip, t, reference_frame(t, frame_counts[clip], u)))
    return picks


def make_batch(
    clips: list[ClipTensors], picks: list[tuple[int, int, int]], window_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model_input (N, 3C, h, w), audio_tokens (N, K, D), target (N, C, h, w))`` float32."""
    target, ref, prior, tokens = [], [], [], []
    for c, t, r in picks:
        clip = clips[c]
        target.append(clip.latents[t])
        ref.append(clip.latents[r])
        prior.append(clip.prior[t])
        tokens.append(audio_window_tokens(clip.hubert, torch.tensor([t]), window_frames)[0])
    tgt = torch.stack(target).float()
    x = unet_input(tgt, torch.stack(ref).float(), torch.stack(prior).float())
    return x, torch.stack(tokens), tgt
