"""Training objectives of the three DualForce stages (§6.1, §6.3.4, §9).

Sign convention, stated once: the flow-matching path at noise level σ ∈ [0, 1] is
``x̃ = (1 − σ)·x + σ·ε`` (σ = 0 clean, σ = 1 pure noise); the model predicts the velocity
``v = dx̃/dσ = ε − x``, so the clean sample is ``x = x̃ − σ·v`` and an Euler step from σ_a to
σ_b is ``x̃ + (σ_b − σ_a)·v``. (The seed's pseudo-code writes the target as ``x − ε``; with
its own path that is the negative of the derivative, so it is not used.)

Diffusion Forcing: σ_v ~ U(0, ``video_max``) and σ_s ~ U(0, ``struct_max``) independently
per (sample, frame); audio and reference are never noised.

- stage 1 (:func:`stage1_loss`): structure projector, motion reconstruction + FLAME.
- stage 2 (:func:`stage2_loss`): video only, causal flow matching (per-frame σ_v).
- stage 3 (:func:`stage3_loss`): ``L = L_video + w_s·L_struct + w_f·L_flame + w_l·L_lip``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from generators.dualforce.config import DualForceConfig, LossWeights, NoiseConfig
from generators.dualforce.model import DualForceInputs, DualForceTransformer
from generators.dualforce.structure import StructureProjector


@dataclass
class DualForceBatch:
    """A batch of clips from the feature cache (one clip per row, ``T`` frames each)."""

    latents: torch.Tensor  # (B, T, C, H, W) VAE latents, already normalised by the VAE stage
    motion: torch.Tensor  # (B, T, 133) LivePortrait motion
    flame: torch.Tensor  # (B, T, 159) EMOCA FLAME
    hubert: torch.Tensor  # (B, T, 2, D) HuBERT, steps 2i, 2i+1 of frame i
    reference: torch.Tensor  # (B, N, D) DINOv2 CLS + patch tokens


def sample_sigmas(
    batch: int,
    frames: int,
    cfg: NoiseConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-(sample, frame) σ_v ~ U(0, video_max), σ_s ~ U(0, struct_max)."""
    u = torch.rand(2, batch, frames, generator=generator, device=device)
    return u[0] * cfg.video_max, u[1] * cfg.struct_max


def add_noise(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(1 − σ)·x + σ·ε`` with per-frame σ ``(B, T)`` broadcast over ``x``'s trailing dims."""
    s = sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))
    return (1 - s) * x + s * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def lip_sync_loss(
    mouth: torch.Tensor, audio: torch.Tensor, shifts: list[int], temperature: float
) -> torch.Tensor:
    """§6.3.4 InfoNCE: mouth ``(B, T, E)`` vs the same frame's audio ``(B, T, E)`` (positive)
    and the audio rolled along time by each of ``shifts`` frames (negatives); cosine
    similarity over ``temperature``."""
    m = F.normalize(mouth, dim=-1)
    a = F.normalize(audio, dim=-1)
    pos = (m * a).sum(-1, keepdim=True)
    negs = [(m * a.roll(k, dims=1)).sum(-1, keepdim=True) for k in shifts]
    logits = torch.cat([pos, *negs], -1) / temperature
    return -F.log_softmax(logits, -1)[..., 0].mean()


def sample_shifts(frames: int, w: LossWeights, generator: torch.Generator | None) -> list[int]:
    """``lip_negatives`` shifts in ``[lip_min_shift, lip_max_shift]``, kept below ``frames``
    so a roll never wraps back onto the positive."""
    hi = min(w.lip_max_shift, frames - 1)
    if hi < w.lip_min_shift:
        return []
    draw = torch.randint(w.lip_min_shift, hi + 1, (w.lip_negatives,), generator=generator)
    return [int(k) for k in draw]


def stage1_loss(
    projector: StructureProjector, motion: torch.Tensor, flame: torch.Tensor, flame_weight: float
) -> dict[str, torch.Tensor]:
    """Standardised motion reconstruction MSE + ``flame_weight`` × standardised FLAME MSE."""
    latent = projector.encode(motion)
    recon = F.mse_loss(projector.decode_normalised(latent), projector.normalise_motion(motion))
    fl = F.mse_loss(projector.flame_normalised(latent), projector.normalise_flame(flame))
    return {"loss": recon + flame_weight * fl, "recon": recon.detach(), "flame": fl.detach()}


def stage2_loss(
    model: DualForceTransformer,
    batch: DualForceBatch,
    cfg: NoiseConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Causal flow matching on video latents only (no structure, no audio)."""
    x = batch.latents
    sigma_v, _ = sample_sigmas(x.shape[0], x.shape[1], cfg, generator, x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = model(DualForceInputs(add_noise(x, sigma_v, eps), sigma_v, batch.reference))
    loss = F.mse_loss(out.video_velocity, velocity_target(x, eps))
    return {"loss": loss, "video": loss.detach()}


def stage3_loss(
    model: DualForceTransformer,
    projector: StructureProjector,
    batch: DualForceBatch,
    cfg: DualForceConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Multi-modal diffusion forcing with the four weighted terms; audio is dropped per
    sample with probability ``losses.audio_dropout`` (the CFG-unconditional branch)."""
    w = cfg.losses
    x = batch.latents
    b, t = x.shape[:2]
    with torch.no_grad():
        s = projector.encode(batch.motion)
        flame_target = projector.normalise_flame(batch.flame)
    sigma_v, sigma_s = sample_sigmas(b, t, cfg.noise, generator, x.device)
    eps_v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    eps_s = torch.randn(s.shape, generator=generator, device=x.device, dtype=s.dtype)
    keep = (torch.rand(b, generator=generator, device=x.device) >= w.audio_dropout).to(x.dtype)
    noisy_v = add_noise(x, sigma_v, eps_v)
    out = model(
        DualForceInputs(
            noisy_v,
            sigma_v,
            batch.reference,
            add_noise(s, sigma_s, eps_s),
            sigma_s,
            batch.hubert,
            keep,
        )
    )
    assert out.struct_velocity is not None and out.flame is not None
    l_video = F.mse_loss(out.video_velocity, velocity_target(x, eps_v))
    l_struct = F.mse_loss(out.struct_velocity, velocity_target(s, eps_s))
    l_flame = F.mse_loss(out.flame, flame_target)
    clean_v = noisy_v - sigma_v[..., None, None, None] * out.video_velocity
    shifts = sample_shifts(t, w, generator)
    if shifts:
        l_lip = lip_sync_loss(
            model.lip.mouth_embedding(clean_v),
            model.lip.audio_embedding(batch.hubert),
            shifts,
            w.lip_temperature,
        )
    else:
        l_lip = torch.zeros((), device=x.device)
    loss = w.video * l_video + w.struct * l_struct + w.flame * l_flame + w.lip * l_lip
    return {
        "loss": loss,
        "video": l_video.detach(),
        "struct": l_struct.detach(),
        "flame": l_flame.detach(),
        "lip": l_lip.detach(),
    }
