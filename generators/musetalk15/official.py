"""The official MuseTalk 1.5 data path: its released UNet as a ``musetalk15`` sampling baseline.

:meth:`generators.musetalk15.family.Musetalk15Family.load_official` reads the release folder
(``musetalk.json`` + ``unet.pth`` / ``unet.safetensors``, see
:mod:`models.musetalk15_official`) and returns an :class:`OfficialUNetSpec`; sampling then
follows the official inference (``scripts/inference.py`` of TMElyralab/MuseTalk, v1.5)
exactly, from features the features stage stores:

- **UNet input** (``musetalk/models/vae.py``, ``VAE.get_latents_for_unet``):
  ``cat([masked_latents, ref_latents], dim=1)`` (8 channels), where ``masked_latents``
  encodes the 256×256 face crop with its lower half set to 0 (black) in [0, 1] pixel space
  before ``Normalize(0.5, 0.5)`` and ``ref_latents`` encodes the same crop unmasked: the
  reference is the frame itself. The features stage writes both (``vae_latents`` tensors
  ``latents`` and ``masked_latents``, with ``features.vae: vae-sd`` and
  ``features.masked_latents: true``); latents are ``0.18215 ×`` the posterior.
- **Audio tokens** (``musetalk/utils/audio_processor.py``, ``get_whisper_chunk``): every
  Whisper-tiny encoder hidden state at 50 Hz, ``(T_50, 5, 384)``, padded with
  ``2 × 2 = 4`` zero steps on the left and ``2 × 3 × 2 = 12`` on the right; video frame ``i``
  takes padded steps ``[2i, 2i + 10)``: original steps ``2i − 4 … 2i + 5`` = frames
  ``i − 2 … i + 2``, zeros outside the clip, flattened ``(10, 5, 384) → (50, 384)`` in
  ``(step, layer)`` order (:func:`whisper_window`); then ``PositionalEncoding(d_model=384)``
  (``musetalk/models/unet.py``) is added over the 50 tokens (:func:`positional_encoding`).
- **Prediction**: ``unet(input, timestep=0, encoder_hidden_states=tokens).sample`` → 4-channel
  latents, decoded with ``vae.decode(latents / 0.18215)`` (the generate stage's
  :func:`models.vae.decode_latents`, the VAE that made the latents).

Known, deliberate differences: the features stage encodes with the posterior's ``mode()``
where the official code calls ``sample()`` (features are deterministic); the official code
trims Whisper to ``floor(seconds · 50)`` steps and zero-pads, the features stage keeps the
steps covering the audio and repeats the last one when a clip's audio is a step short
(for a 25 fps clip of exactly ``T`` frames both give the same ``2T`` steps); the official
script cycles the video frames to the audio's length, the generate stage cuts both to the
shorter. The crop size is the faces stage's (``faces.crop_size_px: 256`` is the official
one; the UNet is convolutional and runs at other sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from generators.family_config import DataLayout, ModelSpec
from generators.musetalk15.config import FAMILY
from generators.musetalk15.model import frame_windows, predict_latents

LATENTS, MASKED, WHISPER = "vae_latents", "masked_latents", "whisper"
MASKED_KEY = f"{LATENTS}/{MASKED}"  # how the stages pass an extra tensor of a feature file
WINDOW_FRAMES = 2  # audio_padding_length_left / _right: frames i-2 .. i+2
STEPS_PER_FRAME = 2  # Whisper's 50 Hz steps per 25 fps video frame


class OfficialUNetSpec(ModelSpec):
    """The released UNet's config and the data layout it is fed with (never trained here)."""

    family: Literal["musetalk15"] = FAMILY
    official: Literal[True] = True
    unet_config: dict[str, Any]  # musetalk.json without its "_" keys
    latent_channels: int  # 4: SD-VAE latents (masked + reference = in_channels)
    audio_dim: int  # cross_attention_dim = Whisper width (384 for tiny)
    audio_layers: int  # Whisper hidden states per step (L + 1 = 5 for tiny)
    audio_steps_per_frame: int = STEPS_PER_FRAME
    audio_window_frames: int = WINDOW_FRAMES

    @property
    def audio_tokens(self) -> int:
        """50 for Whisper-tiny: ``(2w + 1) · steps · layers``."""
        return (2 * self.audio_window_frames + 1) * self.audio_steps_per_frame * self.audio_layers


def official_spec(config: dict[str, Any], layout: DataLayout) -> OfficialUNetSpec:
    """The spec for a release config and a clip layout; ``ValueError`` saying what is missing.

    Needs ``in_channels == 2 × out_channels`` (masked + reference), ``vae_latents`` with
    ``out_channels`` channels (SD-VAE) and ``whisper`` ``(2, L + 1, cross_attention_dim)``.
    The ``masked_latents`` tensor is not part of a layout: its absence is reported when the
    clip's tensors are read (and by :func:`prepare_official_clip`).
    """
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    in_ch, out_ch, dim = (
        cfg.get(k) for k in ("in_channels", "out_channels", "cross_attention_dim")
    )
    if not all(isinstance(v, int) for v in (in_ch, out_ch, dim)) or in_ch != 2 * out_ch:
        raise ValueError(
            f"not the MuseTalk 1.5 UNet layout: in_channels {in_ch} should be 2 × out_channels "
            f"{out_ch} (masked + reference latents), cross_attention_dim {dim} an int"
        )
    lat = layout.shapes.get(LATENTS)
    if lat is None or len(lat) != 3 or lat[0] != out_ch:
        raise ValueError(
            f"the official MuseTalk 1.5 UNet reads {out_ch}-channel SD-VAE latents "
            f"(features.vae: vae-sd, stabilityai/sd-vae-ft-mse); the clip's vae_latents are "
            f"{lat}"
        )
    audio = layout.shapes.get(WHISPER)
    if audio is None:
        raise ValueError(
            "the official MuseTalk 1.5 UNet needs Whisper features "
            "(features.whisper: openai/whisper-tiny); the clip has none"
        )
    if len(audio) != 3 or audio[0] != STEPS_PER_FRAME or audio[2] != dim:
        raise ValueError(
            f"the official MuseTalk 1.5 UNet needs Whisper features ({STEPS_PER_FRAME}, L+1, "
            f"{dim}) per frame (openai/whisper-tiny for cross_attention_dim 384); the clip's "
            f"whisper features are {audio}"
        )
    return OfficialUNetSpec(
        unet_config=cfg, latent_channels=out_ch, audio_dim=dim, audio_layers=audio[1]
    )


def positional_encoding(num_tokens: int, d_model: int) -> torch.Tensor:
    """``(num_tokens, d_model)``: MuseTalk's ``PositionalEncoding`` (``musetalk/models/unet.py``).

    ``pe[:, 0::2] = sin(pos · div)``, ``pe[:, 1::2] = cos(pos · div)`` with
    ``div = exp(arange(0, d, 2) · (−ln 10000 / d))`` — interleaved, unlike the trained
    family's :func:`generators.musetalk15.model.sinusoidal_positions`.
    """
    if d_model % 2:
        raise ValueError(f"MuseTalk's positional encoding needs an even width, got {d_model}")
    position = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe = torch.zeros(num_tokens, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def whisper_window(
    whisper: torch.Tensor, frames: torch.Tensor, window_frames: int = WINDOW_FRAMES
) -> torch.Tensor:
    """``get_whisper_chunk``'s window: ``(T, S, L, D)`` → ``(len(frames), (2w+1)·S·L, D)``.

    ``whisper[t, s]`` is 50 Hz step ``S·t + s`` (the features stage's layout). Frame ``i``
    gets frames ``i − w … i + w`` (zeros outside ``[0, T)``), i.e. steps ``S(i − w) …
    S(i + w) + S − 1``, flattened with the layer index fastest: token ``k = step·L + layer``.
    Float32, no positional encoding.
    """
    if whisper.ndim != 4:
        raise ValueError(f"expected whisper features (T, S, L, D), got {tuple(whisper.shape)}")
    num_frames, steps, layers, dim = whisper.shape
    return frame_windows(whisper.reshape(num_frames, steps * layers, dim), frames, window_frames)


def official_audio_tokens(
    whisper: torch.Tensor, frames: torch.Tensor, window_frames: int = WINDOW_FRAMES
) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states``: the window plus the positional encoding."""
    tokens = whisper_window(whisper, frames, window_frames)
    return tokens + positional_encoding(tokens.shape[1], tokens.shape[2])[None]


def official_unet_input(latents: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """``cat([masked, reference], dim=1)`` with the frame itself as reference, float32."""
    return torch.cat([masked_latents.float(), latents.float()], dim=1)


@dataclass
class OfficialClip:
    """A clip ready for :func:`sample_official`: per-frame latents, masked latents, Whisper."""

    latents: torch.Tensor  # (T, C, h, w)
    masked: torch.Tensor  # (T, C, h, w)
    whisper: torch.Tensor  # (T, S, L, D)
    window_frames: int


def prepare_official_clip(
    spec: OfficialUNetSpec, features: dict[str, torch.Tensor]
) -> OfficialClip:
    """Check a clip's tensors against the spec; ``ValueError`` naming what does not fit."""
    if MASKED_KEY not in features:
        raise ValueError(
            "the official MuseTalk 1.5 baseline needs vae_latents tensor masked_latents "
            "(features.masked_latents: true)"
        )
    latents, masked, whisper = features[LATENTS], features[MASKED_KEY], features[WHISPER]
    if latents.ndim != 4 or latents.shape[0] == 0 or masked.shape != latents.shape:
        raise ValueError(f"latents {tuple(latents.shape)} / masked {tuple(masked.shape)}")
    want = (spec.audio_steps_per_frame, spec.audio_layers, spec.audio_dim)
    if latents.shape[1] != spec.latent_channels or tuple(whisper.shape[1:]) != want:
        raise ValueError(
            f"features {tuple(latents.shape[1:])}/{tuple(whisper.shape[1:])} do not fit the "
            f"official UNet (latent channels {spec.latent_channels}, whisper {want})"
        )
    if whisper.shape[0] != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} latent vs {whisper.shape[0]} whisper frames")
    return OfficialClip(latents, masked, whisper, spec.audio_window_frames)


def sample_official(
    model: torch.nn.Module, clip: OfficialClip, frames: torch.Tensor
) -> torch.Tensor:
    """Predicted latents ``(len(frames), C, h, w)``: one UNet pass at timestep 0."""
    device = next(model.parameters()).device
    x = official_unet_input(clip.latents[frames], clip.masked[frames])
    tokens = official_audio_tokens(clip.whisper, frames, clip.window_frames)
    return predict_latents(model, x.to(device), tokens.to(device))
