"""The ``dualforce`` family: a causal video + 3D-structure diffusion-forcing DiT (issue 12).

Reads per clip what the features stage extracts: VAE latents, LivePortrait motion (133),
EMOCA FLAME (159), HuBERT (two steps per frame) and the DINOv2 patch tokens of one
reference frame (a per-clip feature, no frame axis). ``training_stage`` selects §9's stage:

- ``stage1``: the structure projector (motion ↔ structure latent, FLAME regression); the
  training set's motion/FLAME column statistics are set by :meth:`prepare_model`;
- ``stage2``: causal flow matching of the video backbone, video only;
- ``stage3``: multi-modal diffusion forcing, LoRA on the backbone, new modules trained.

Each stage starts from the previous one's committed checkpoint through the train
section's ``init_from: {stage: ...}`` (:meth:`init_from_parent`). See
``configs/dualforce_stage{1,2,3}.yaml``.

Sampling is autoregressive: :meth:`prepare_clip` holds a generation session (KV cache) and
:meth:`sample` must be asked for consecutive frame ranges in order (``0..k``, ``k+1..``),
which is how the generate stage walks a clip; asking for frame 0 again restarts the clip.
One frame is generated per audio frame, so cross-audio generation passes another clip's
``hubert`` with this clip's ``vae_latents`` (reference latent) and ``reference`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file

from generators.dualforce.config import (
    FAMILY,
    DualForceConfig,
    DualForceSpec,
)
from generators.dualforce.data import (
    AUDIO,
    FLAME,
    LATENTS,
    MOTION,
    PER_CLIP,
    REFERENCE,
    TENSOR_NAMES,
    TrainingData,
    load_clips,
    make_batch,
)
from generators.dualforce.model import parameter_count
from generators.dualforce.network import DualForceModel, for_inference, load_parent
from generators.dualforce.sampler import GenerationSession
from generators.family import Batch, ModelFamily, unwrap
from generators.family_config import DataLayout, FamilyConfig, FeatureClip, ModelSpec
from generators.registry import register

SAMPLING_FEATURES = (LATENTS, AUDIO, REFERENCE)


@dataclass
class PreparedClip:
    """A clip ready for autoregressive sampling; ``session`` carries the KV cache."""

    spec: DualForceSpec
    reference_tokens: torch.Tensor  # (1, N, D)
    reference_latent: torch.Tensor  # (1, C, h, w)
    audio: torch.Tensor  # (1, T, 2, D)
    session: GenerationSession | None = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return int(self.audio.shape[1])


@register
class DualForceFamily(ModelFamily[DualForceConfig, DualForceSpec]):
    name: ClassVar[str] = FAMILY
    config_type: ClassVar[type[FamilyConfig]] = DualForceConfig
    spec_type: ClassVar[type[ModelSpec]] = DualForceSpec
    features: ClassVar[dict[str, str]] = dict(TENSOR_NAMES)
    clip_features: ClassVar[frozenset[str]] = PER_CLIP

    def features_for(self, spec: DualForceSpec) -> dict[str, str]:
        return {f: TENSOR_NAMES[f] for f in SAMPLING_FEATURES}

    def make_spec(self, layout: DataLayout) -> DualForceSpec:
        shapes = layout.shapes
        missing = sorted(set(TENSOR_NAMES) - set(shapes))
        if missing:
            raise ValueError(f"dualforce needs features {missing}")
        lat, hub, ref = shapes[LATENTS], shapes[AUDIO], shapes[REFERENCE]
        if len(lat) != 3 or len(hub) != 2 or len(ref) != 2:
            raise ValueError(
                f"dualforce needs latents (C, h, w), hubert (S, D) and reference tokens (N, D); "
                f"got {lat}, {hub}, {ref}"
            )
        if round(ref[0] ** 0.5) ** 2 != ref[0]:
            raise ValueError(f"reference tokens must form a square grid, got {ref[0]}")
        arch = self.config.arch(
            in_channels=lat[0],
            latent_height=lat[1],
            latent_width=lat[2],
            audio_steps_per_frame=hub[0],
            audio_dim=hub[1],
            image_dim=ref[1],
            motion_dim=shapes[MOTION][-1],
            flame_dim=shapes[FLAME][-1],
        )
        cfg = self.config
        return DualForceSpec(
            training_stage=cfg.training_stage,
            arch=arch,
            clip_frames=cfg.clip_frames,
            lora=cfg.lora,
            sampler=cfg.sampler,
        )

    def build(self, spec: DualForceSpec) -> DualForceModel:
        return DualForceModel(spec)

    def describe(self, spec: DualForceSpec) -> str:
        a = spec.arch
        counts = parameter_count(a) if spec.training_stage != "stage1" else {}
        size = ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in counts.items())
        return (
            f"{spec.training_stage}: {a.num_layers} blocks ({a.fusion_depth} shallow) width "
            f"{a.dim}, struct {a.struct_tokens_per_frame}x{a.struct_dim}, window "
            f"{a.window_frames} frames, latents {a.in_channels}x{a.latent_height}x"
            f"{a.latent_width}; {size or 'projector only'}"
        )

    def load_model(self, path: Path, spec: DualForceSpec) -> DualForceModel:
        """Strict load, then stage 3's adapters merged into the backbone (same outputs)."""
        model = super().load_model(path, spec)
        return for_inference(model)  # type: ignore[arg-type]

    def init_from_parent(
        self,
        model: torch.nn.Module,
        spec: DualForceSpec,
        parent_weights: Path,
        parent_spec_json: str,
    ) -> None:
        parent = self.parse_spec(parent_spec_json)
        load_parent(unwrap(model), load_file(str(parent_weights)), parent.training_stage)  # type: ignore[arg-type]

    def prepare_model(
        self, model: torch.nn.Module, spec: DualForceSpec, data: TrainingData
    ) -> None:
        """Stage 1: the projector standardises with the training set's column statistics."""
        if spec.training_stage == "stage1":
            unwrap(model).projector.set_statistics(data.motion_stats, data.flame_stats)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ training

    def load_training_data(
        self, spec: DualForceSpec, clips: list[FeatureClip], bank_path: str | None
    ) -> TrainingData:
        return load_clips(spec, self.config, clips)

    def training_batch(
        self, data: TrainingData, seed: int, step: int, global_batch: int, start: int, stop: int
    ) -> Batch:
        return make_batch(data, self.config, seed, step, start, stop)

    def training_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return model(batch, self.config.losses)

    # ------------------------------------------------------------------ sampling

    def prepare_clip(
        self,
        spec: DualForceSpec,
        features: dict[str, torch.Tensor],
        bank: dict[str, torch.Tensor] | None,
        reference_frame: int,
    ) -> PreparedClip:
        if spec.training_stage == "stage1":
            raise ValueError("a stage-1 checkpoint holds only the structure projector: no video")
        a = spec.arch
        latents, hubert, tokens = features[LATENTS], features[AUDIO], features[REFERENCE]
        want_lat = (a.in_channels, a.latent_height, a.latent_width)
        want_aud = (a.audio_steps_per_frame, a.audio_dim)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want_lat or latents.shape[0] == 0:
            raise ValueError(f"latents {tuple(latents.shape)} do not fit (T, {want_lat})")
        if hubert.ndim != 3 or tuple(hubert.shape[1:]) != want_aud or hubert.shape[0] == 0:
            raise ValueError(f"hubert {tuple(hubert.shape)} does not fit (T, {want_aud})")
        if tokens.ndim != 2 or tokens.shape[1] != a.image_dim:
            raise ValueError(
                f"reference tokens {tuple(tokens.shape)} do not fit (N, {a.image_dim})"
            )
        ref = min(reference_frame, latents.shape[0] - 1)
        return PreparedClip(
            spec, tokens[None].float(), latents[ref : ref + 1].float(), hubert[None].float()
        )

    def sample(
        self, model: torch.nn.Module, clip: PreparedClip, frames: torch.Tensor
    ) -> torch.Tensor:
        """Latents ``(len(frames), C, h, w)`` of the next consecutive frames (see module doc)."""
        want = frames.tolist()
        first = want[0] if want else 0
        if want != list(range(first, first + len(want))) or first + len(want) > clip.num_frames:
            raise ValueError(
                f"dualforce samples consecutive frames within 0..{clip.num_frames - 1}, "
                f"got {want[:3]}..."
            )
        if clip.session is None or first == 0:
            clip.session = self._session(model, clip)
        if first != clip.session.t:
            raise ValueError(f"dualforce is at frame {clip.session.t}, asked for frame {first}")
        out = [clip.session.next_frame().video[0] for _ in want]
        return torch.stack(out) if out else clip.reference_latent[:0]

    def _session(self, model: torch.nn.Module, clip: PreparedClip) -> GenerationSession:
        transformer = unwrap(model).require_transformer()  # type: ignore[union-attr]
        p = next(transformer.parameters())
        dev, dt = p.device, p.dtype
        return GenerationSession(
            transformer,
            clip.spec.sampler,
            clip.reference_tokens.to(dev, dt),
            clip.reference_latent.to(dev, dt),
            clip.audio.to(dev, dt),
            generator=torch.Generator().manual_seed(clip.spec.sampler.seed),
        )
