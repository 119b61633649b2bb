"""The MuseTalk 1.5 layout latent UNet (family ``musetalk15``): a one-step regressor.

Input, per frame, concatenated on channels (``3 × latent_channels`` for a Flux.1 VAE = 48):

1. the target frame's latents with the lower half zeroed (the mouth region to be inpainted),
2. reference latents of another frame of the same clip (identity and appearance),
3. the Engram prior: the memory bank's mouth-region latents for the frame's audio codes,
   placed in the lower half, zeros in the upper half.

Audio conditioning goes through cross-attention: the frame's HuBERT window (frames
``t-w .. t+w`` × steps per frame, zero-padded at clip edges) as ``encoder_hidden_states``,
with a fixed sinusoidal position encoding added *in one function used by training and
generation alike* (MuseTalk 1.5 adds it only at inference, a known train/test mismatch).
The timestep is a constant 0, as in MuseTalk: there is no noise; the output is the
predicted target latents directly.

``unet: tiny`` is a ~0.4 M-parameter UNet that trains on CPU in seconds; ``unet: full``
is the ``musetalk.json`` layout (320/640/1280/1280). Weights are plain safetensors
(``state_dict`` of ``UNet2DConditionModel``); the model is rebuilt from
:class:`LatentUNetSpec` JSON, never unpickled.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel

from generators.family_config import ModelSpec
from generators.musetalk15.config import FAMILY


def tiny_unet_config(
    in_channels: int, out_channels: int, audio_dim: int, sample_size: int
) -> dict[str, Any]:
    """A ~0.4 M-parameter UNet (two cross-attention levels) that trains on CPU in seconds."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": audio_dim,
    }


def musetalk_unet_config(
    in_channels: int, out_channels: int, audio_dim: int, sample_size: int
) -> dict[str, Any]:
    """The MuseTalk 1.5 layout (``musetalk.json``) with our channel counts and audio width."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": audio_dim,
    }


class LatentUNetSpec(ModelSpec):
    """Everything needed to rebuild the model and feed it exactly as in training.

    Serialised as ``TrainedCheckpoint.model_config_json``.
    """

    family: Literal["musetalk15"] = FAMILY
    unet_config: dict[str, Any]  # diffusers UNet2DConditionModel kwargs
    latent_channels: int
    prior_channels: int
    audio_dim: int
    audio_steps_per_frame: int  # HuBERT steps per video frame (2 at 50 Hz / 25 fps)
    audio_window_frames: int  # w: frames t-w..t+w condition frame t

    @property
    def audio_tokens(self) -> int:
        return (2 * self.audio_window_frames + 1) * self.audio_steps_per_frame


def make_spec(
    latent_channels: int,
    audio_dim: int,
    sample_size: int,
    *,
    tiny: bool,
    prior_channels: int | None = None,
    audio_steps_per_frame: int = 2,
    audio_window_frames: int = 2,
) -> LatentUNetSpec:
    prior = latent_channels if prior_channels is None else prior_channels
    in_ch = 2 * latent_channels + prior
    cfg_fn = tiny_unet_config if tiny else musetalk_unet_config
    cfg = cfg_fn(in_ch, latent_channels, audio_dim, sample_size)
    return LatentUNetSpec(
        unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        latent_channels=latent_channels,
        prior_channels=prior,
        audio_dim=audio_dim,
        audio_steps_per_frame=audio_steps_per_frame,
        audio_window_frames=audio_window_frames,
    )


def build_unet_from_spec(spec: LatentUNetSpec) -> UNet2DConditionModel:
    """A freshly initialised UNet with ``2 × latent + prior`` inputs (masked, ref, prior)."""
    return UNet2DConditionModel(**spec.unet_config)


# ---------------------------------------------------------------------------- conditioning


def mask_lower_half(latents: torch.Tensor) -> torch.Tensor:
    """Zero rows ``h//2:`` of ``(N, C, h, w)`` latents (the mouth region), as MuseTalk does."""
    out = latents.clone()
    out[:, :, latents.shape[2] // 2 :, :] = 0
    return out


def place_lower_half(prior: torch.Tensor, height: int) -> torch.Tensor:
    """Put a ``(N, C, h - h//2, w)`` mouth prior into the lower half of a zero ``(N, C, h, w)``."""
    lower = height - height // 2
    if prior.shape[2] != lower:
        raise ValueError(f"prior height {prior.shape[2]} does not fit the lower half ({lower})")
    full = prior.new_zeros((prior.shape[0], prior.shape[1], height, prior.shape[3]))
    full[:, :, height // 2 :, :] = prior
    return full


def unet_input(
    target_latents: torch.Tensor, ref_latents: torch.Tensor, prior_half: torch.Tensor
) -> torch.Tensor:
    """``cat([masked target, reference, prior in lower half], dim=1)`` for ``(N, C, h, w)``."""
    height = target_latents.shape[2]
    return torch.cat(
        [mask_lower_half(target_latents), ref_latents, place_lower_half(prior_half, height)],
        dim=1,
    )


def sinusoidal_positions(num_tokens: int, dim: int) -> torch.Tensor:
    """Transformer sinusoidal position encoding ``(num_tokens, dim)`` (odd dims supported)."""
    pos = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    half = (dim + 1) // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = pos * freq[None, :]
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return enc[:, :dim]


def frame_windows(features: torch.Tensor, frames: torch.Tensor, window_frames: int) -> torch.Tensor:
    """``(T, S, D)`` per-frame audio (S steps per video frame) → ``(len(frames), (2w+1)·S, D)``
    float32: frame ``t`` gets frames ``t-w .. t+w`` in order (zeros beyond the clip's
    edges), each frame's ``S`` steps in order. No position encoding."""
    num_frames, steps, dim = features.shape
    offsets = torch.arange(-window_frames, window_frames + 1)
    idx = frames.long()[:, None] + offsets[None, :]  # (N, 2w+1)
    valid = (idx >= 0) & (idx < num_frames)
    gathered = features[idx.clamp(0, max(0, num_frames - 1))].float()  # (N, 2w+1, S, D)
    gathered = torch.where(valid[:, :, None, None], gathered, torch.zeros(()))
    return gathered.reshape(len(frames), (2 * window_frames + 1) * steps, dim)


def audio_window_tokens(
    features: torch.Tensor, frames: torch.Tensor, window_frames: int
) -> torch.Tensor:
    """Cross-attention tokens for ``frames`` of a clip: :func:`frame_windows` of ``(T, S,
    D)`` features plus the sinusoidal position encoding, ``(len(frames), (2w+1)·S, D)``."""
    tokens = frame_windows(features, frames, window_frames)
    return tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2])[None]


def predict_latents(
    unet: torch.nn.Module, model_input: torch.Tensor, audio_tokens: torch.Tensor
) -> torch.Tensor:
    """One-step prediction: constant timestep 0, audio tokens through cross-attention."""
    timestep = torch.zeros((), dtype=torch.long, device=model_input.device)
    return unet(model_input, timestep, encoder_hidden_states=audio_tokens).sample


def spec_summary(spec: LatentUNetSpec) -> str:
    """A short human-readable line for logs."""
    cfg = spec.unet_config
    return json.dumps(
        {
            "blocks": cfg.get("block_out_channels"),
            "in": cfg.get("in_channels"),
            "out": cfg.get("out_channels"),
            "audio_tokens": spec.audio_tokens,
            "audio_dim": spec.audio_dim,
        }
    )
