"""Training objectives of the three DualForce stages (§6.1, §6.3.4, §9).

Sign convention, stated once: the flow-matching path at noise level σ ∈ [0, 1] is
``x̃ = (1 − σ)·x + σ·ε`` (σ = 0 clean, σ = 1 pure noise); the model predicts the velocity
``v = dx̃/dσ = ε − x``, so the clean sample is ``x = x̃ − σ·v`` and an Euler step from σ_a to
σ_b is ``x̃ + (σ_b − σ_a)·v``. (The seed's pseudo-code writes the target as ``x − ε``; with its
own path that is the negative of the derivative, so it is not used.)

Diffusion Forcing: σ_v ~ U(0, ``video_max``) and σ_s ~ U(0, ``struct_max``) independently per
(clip, frame); audio and reference are never noised. Noise, σ, audio dropout and lip-sync
shifts are drawn with the batch (:mod:`generators.dualforce.data`), from ``(seed, step, row)``,
so a resumed run computes exactly the losses an uninterrupted one would.

Clips in a batch may be shorter than the batch's ``T`` (temporal crop, speed change): their
tail is padding, ``valid`` is 0 there and every loss averages over valid frames only. The
model is causal, so padding after a clip's end cannot change its frames.

- stage 1 (:func:`stage1_losses`): structure projector, motion reconstruction + FLAME.
- stage 2 (:func:`stage2_losses`): video only, causal flow matching (per-frame σ_v).
- stage 3 (:func:`stage3_losses`): ``L = w_v·L_video + w_s·L_struct + w_f·L_flame + w_l·L_lip``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generators.dualforce.config import LossWeights, NoiseConfig
from generators.dualforce.model import DualForceInputs, DualForceTransformer
from generators.dualforce.structure import StructureProjector

Batch = dict[str, torch.Tensor]


def sample_sigmas(
    batch: int, frames: int, cfg: NoiseConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-(clip, frame) σ_v ~ U(0, video_max) and σ_s ~ U(0, struct_max)."""
    u = torch.rand(2, batch, frames, generator=generator, dtype=torch.float64)
    return (u[0] * cfg.video_max).float(), (u[1] * cfg.struct_max).float()


def add_noise(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(1 − σ)·x + σ·ε`` with per-frame σ ``(B, T)`` broadcast over ``x``'s trailing dims."""
    s = sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim()))).to(x.dtype)
    return (1 - s) * x + s * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``dx̃/dσ = ε − x``."""
    return noise - x


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid ``(B, T)`` frames of ``(B, T, ...)`` tensors."""
    per_frame = (pred.float() - target.float()).pow(2).flatten(2).mean(-1)
    w = valid.to(per_frame.dtype)
    return (per_frame * w).sum() / w.sum().clamp_min(1.0)


def lip_sync_loss(
    mouth: torch.Tensor,
    audio: torch.Tensor,
    shifts: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """§6.3.4 InfoNCE over valid frames: mouth ``(B, T, E)`` against the same frame's audio
    ``(B, T, E)`` (positive) and the audio ``shifts[b, k]`` frames earlier, wrapping within
    clip ``b``'s valid length (negatives); cosine similarity over ``temperature``. A clip
    whose ``shifts`` row is negative (too short for any shift) has no term."""
    b, t, _ = mouth.shape
    m = F.normalize(mouth.float(), dim=-1)
    a = F.normalize(audio.float(), dim=-1)
    lengths = valid.sum(1).long().clamp_min(1)
    frames = torch.arange(t, device=mouth.device)
    pos = (m * a).sum(-1, keepdim=True)
    idx = (frames[None, :, None] - shifts[:, None, :].clamp_min(0)) % lengths[:, None, None]
    neg_audio = torch.gather(
        a[:, :, None].expand(b, t, shifts.shape[1], a.shape[-1]),
        1,
        idx[..., None].expand(-1, -1, -1, a.shape[-1]),
    )
    negs = (m[:, :, None] * neg_audio).sum(-1)
    logits = torch.cat([pos, negs], -1) / temperature
    nll = -F.log_softmax(logits, -1)[..., 0]
    w = valid.float() * (shifts[:, :1] >= 0).float()
    if w.sum() == 0:  # keeps the heads in the graph (DDP expects every parameter used)
        return 0.0 * (mouth.sum() + audio.sum())
    return (nll * w).sum() / w.sum()


def stage1_losses(
    projector: StructureProjector, batch: Batch, flame_weight: float
) -> dict[str, torch.Tensor]:
    """Standardised motion reconstruction MSE + ``flame_weight`` × standardised FLAME MSE
    (the projector holds the training set's column statistics, set before training)."""
    latent = projector.encode(batch["motion"])
    valid = batch["valid"]
    recon = masked_mse(
        projector.decode_normalised(latent), projector.normalise_motion(batch["motion"]), valid
    )
    fl = masked_mse(
        projector.flame_normalised(latent), projector.normalise_flame(batch["flame"]), valid
    )
    return {"loss": recon + flame_weight * fl, "recon": recon.detach(), "flame": fl.detach()}


def stage2_losses(model: DualForceTransformer, batch: Batch) -> dict[str, torch.Tensor]:
    """Causal flow matching on video latents only (no structure, no audio)."""
    x, eps, sigma_v = batch["latents"], batch["eps_video"], batch["sigma_video"]
    out = model(
        DualForceInputs(
            add_noise(x, sigma_v, eps),
            sigma_v,
            batch["reference_tokens"],
            batch["reference_latent"],
        )
    )
    loss = masked_mse(out.video_velocity, velocity_target(x, eps), batch["valid"])
    return {"loss": loss, "video": loss.detach()}


def stage3_losses(
    model: DualForceTransformer,
    projector: StructureProjector,
    batch: Batch,
    w: LossWeights,
) -> dict[str, torch.Tensor]:
    """Multi-modal diffusion forcing with the four weighted terms (projector frozen)."""
    x, valid = batch["latents"], batch["valid"]
    sigma_v, sigma_s = batch["sigma_video"], batch["sigma_struct"]
    eps_v, eps_s = batch["eps_video"], batch["eps_struct"]
    with torch.no_grad():
        s = projector.encode(batch["motion"])
        flame_target = projector.normalise_flame(batch["flame"])
    noisy_v = add_noise(x, sigma_v, eps_v)
    out = model(
        DualForceInputs(
            noisy_v,
            sigma_v,
            batch["reference_tokens"],
            batch["reference_latent"],
            add_noise(s, sigma_s, eps_s),
            sigma_s,
            batch["hubert"],
            batch["audio_keep"],
        )
    )
    if out.struct_velocity is None or out.flame is None:
        raise RuntimeError("stage 3 needs the structure stream")
    l_video = masked_mse(out.video_velocity, velocity_target(x, eps_v), valid)
    l_struct = masked_mse(out.struct_velocity, velocity_target(s, eps_s), valid)
    l_flame = masked_mse(out.flame, flame_target, valid)
    clean_v = noisy_v - sigma_v[..., None, None, None].to(x.dtype) * out.video_velocity
    l_lip = lip_sync_loss(
        model.lip.mouth_embedding(clean_v),
        model.lip.audio_embedding(batch["hubert"]),
        batch["lip_shifts"],
        valid,
        w.lip_temperature,
    )
    loss = w.video * l_video + w.struct * l_struct + w.flame * l_flame + w.lip * l_lip
    return {
        "loss": loss,
        "video": l_video.detach(),
        "struct": l_struct.detach(),
        "flame": l_flame.detach(),
        "lip": l_lip.detach(),
    }
