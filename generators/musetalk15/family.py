"""The ``musetalk15`` family: the MuseTalk 1.5 layout latent UNet, one-step MSE regression.

Training minimises the MSE between the predicted and the true latents of a frame (no
noise, timestep 0); sampling is the same single forward pass with a fixed reference frame
of the clip. Both read the Engram memory bank as a mouth prior in the input channels.

:meth:`Musetalk15Family.load_official` turns the released MuseTalk 1.5 UNet (imported with
``talkforge models import musetalk15-official DIR``) into a sampling baseline: its spec is
an :class:`~generators.musetalk15.official.OfficialUNetSpec`, for which the family reads
Whisper features and the SD-VAE ``latents`` + ``masked_latents`` (no HuBERT, no memory
bank) and samples through the official data path (:mod:`generators.musetalk15.official`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel as UNet

from generators.family import Batch, ModelFamily
from generators.family_config import DataLayout, FamilyConfig, FeatureClip, ModelSpec
from generators.musetalk15.config import FAMILY, Musetalk15Config
from generators.musetalk15.data import (
    AUDIO,
    LATENTS,
    TENSOR_NAMES,
    ClipTensors,
    clip_tensors,
    load_clips,
    make_batch,
    step_picks,
)
from generators.musetalk15.model import (
    LatentUNetSpec,
    audio_window_tokens,
    build_unet_from_spec,
    make_spec,
    predict_latents,
    spec_summary,
    unet_input,
)
from generators.musetalk15.official import (
    MASKED,
    WHISPER,
    OfficialClip,
    OfficialUNetSpec,
    official_spec,
    prepare_official_clip,
    sample_official,
)
from generators.registry import register
from models.musetalk15_official import read_official_unet


@dataclass
class TrainingClips:
    clips: list[ClipTensors]
    window_frames: int

    @property
    def frame_counts(self) -> list[int]:
        return [c.num_frames for c in self.clips]


@dataclass
class PreparedClip:
    """A clip ready for sampling: its latents, audio, prior and reference latents."""

    tensors: ClipTensors
    reference: torch.Tensor  # (1, C, h, w) float32
    window_frames: int


@register
class Musetalk15Family(ModelFamily[Musetalk15Config, LatentUNetSpec]):
    name: ClassVar[str] = FAMILY
    config_type: ClassVar[type[FamilyConfig]] = Musetalk15Config
    spec_type: ClassVar[type[ModelSpec]] = LatentUNetSpec
    features: ClassVar[dict[str, str]] = {k: TENSOR_NAMES[k] for k in (LATENTS, AUDIO)}
    uses_memory_bank: ClassVar[bool] = True

    # the official baseline (OfficialUNetSpec) reads other features than trained checkpoints
    def features_for(self, spec: LatentUNetSpec | OfficialUNetSpec) -> dict[str, str]:
        if isinstance(spec, OfficialUNetSpec):
            return {LATENTS: TENSOR_NAMES[LATENTS], WHISPER: "features"}
        return dict(self.features)

    def extra_tensors_for(
        self, spec: LatentUNetSpec | OfficialUNetSpec
    ) -> dict[str, tuple[str, ...]]:
        return {LATENTS: (MASKED,)} if isinstance(spec, OfficialUNetSpec) else {}

    def uses_memory_bank_for(self, spec: LatentUNetSpec | OfficialUNetSpec) -> bool:
        return not isinstance(spec, OfficialUNetSpec)

    def make_spec(self, layout: DataLayout) -> LatentUNetSpec:
        lat, hub = layout.shapes[LATENTS], layout.shapes[AUDIO]
        if len(lat) != 3 or len(hub) != 2:
            raise ValueError(f"musetalk15 needs latents (C, h, w) and audio (S, D), got {layout}")
        if lat[1] % 2:
            raise ValueError(f"latent height {lat[1]} is odd")
        return make_spec(
            lat[0],
            hub[1],
            lat[1],
            tiny=self.config.unet == "tiny",
            audio_steps_per_frame=hub[0],
            audio_window_frames=self.config.audio_window_frames,
        )

    def build(self, spec: LatentUNetSpec) -> torch.nn.Module:
        return build_unet_from_spec(spec)

    def describe(self, spec: LatentUNetSpec) -> str:
        return spec_summary(spec)

    def load_official(self, weights: Path, layout: DataLayout) -> tuple[OfficialUNetSpec, UNet]:
        """The released MuseTalk 1.5 UNet (``musetalk.json`` + ``unet.pth`` or
        ``unet.safetensors``, read without unpickling code) as an eval-mode
        ``UNet2DConditionModel``, loaded strictly. ``ValueError`` when the clips' ``layout``
        cannot feed it (see :func:`~generators.musetalk15.official.official_spec`)."""
        config, state = read_official_unet(weights)
        spec = official_spec(config, layout)
        try:
            model = UNet(**spec.unet_config)
        except TypeError as exc:  # a key UNet2DConditionModel does not take
            raise ValueError(f"{weights}: musetalk.json is not a UNet config: {exc}") from exc
        model.load_state_dict(state, strict=True)
        return spec, model.eval()

    # ------------------------------------------------------------------ training

    def load_training_data(
        self, spec: LatentUNetSpec, clips: list[FeatureClip], bank_path: str | None
    ) -> TrainingClips:
        if bank_path is None:
            raise ValueError("musetalk15 trains with an Engram memory bank")
        return TrainingClips(load_clips(clips, bank_path), spec.audio_window_frames)

    def training_batch(
        self, data: TrainingClips, seed: int, step: int, global_batch: int, start: int, stop: int
    ) -> Batch:
        picks = step_picks(data.frame_counts, seed, step, global_batch)[start:stop]
        x, tokens, target = make_batch(data.clips, picks, data.window_frames)
        return {"input": x, "audio": tokens, "target": target}

    def training_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        pred = predict_latents(model, batch["input"], batch["audio"])
        return {"loss": F.mse_loss(pred.float(), batch["target"])}

    # ------------------------------------------------------------------ sampling

    def prepare_clip(
        self,
        spec: LatentUNetSpec | OfficialUNetSpec,
        features: dict[str, torch.Tensor],
        bank: dict[str, torch.Tensor] | None,
        reference_frame: int,
    ) -> PreparedClip | OfficialClip:
        """Official spec: each frame is its own reference (``reference_frame`` and ``bank``
        are unused); trained spec: the fixed ``reference_frame`` and the Engram prior."""
        if isinstance(spec, OfficialUNetSpec):
            return prepare_official_clip(spec, features)
        latents, hubert = features[LATENTS], features[AUDIO]
        if latents.ndim != 4 or hubert.ndim != 3 or latents.shape[0] == 0:
            raise ValueError(f"latents {tuple(latents.shape)} / hubert {tuple(hubert.shape)}")
        want_lat = (spec.latent_channels, spec.unet_config.get("sample_size"))
        want_aud = (spec.audio_steps_per_frame, spec.audio_dim)
        if (latents.shape[1], latents.shape[2]) != want_lat or tuple(hubert.shape[1:]) != want_aud:
            raise ValueError(
                f"features {tuple(latents.shape[1:])}/{tuple(hubert.shape[1:])} do not fit the "
                f"checkpoint (latents (C, h) {want_lat}, audio {want_aud})"
            )
        if bank is None:
            raise ValueError("musetalk15 samples with an Engram memory bank")
        tensors = clip_tensors("clip", latents, hubert, bank)
        ref_idx = min(reference_frame, tensors.num_frames - 1)
        ref = latents[ref_idx : ref_idx + 1].float()
        return PreparedClip(tensors, ref, spec.audio_window_frames)

    def sample(
        self, model: torch.nn.Module, clip: PreparedClip | OfficialClip, frames: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(clip, OfficialClip):
            return sample_official(model, clip, frames)
        device = next(model.parameters()).device
        t = clip.tensors
        target = t.latents[frames].float()
        x = unet_input(target, clip.reference.expand(len(frames), -1, -1, -1), t.prior[frames])
        tokens = audio_window_tokens(t.hubert, frames, clip.window_frames)
        return predict_latents(model, x.to(device), tokens.to(device))
