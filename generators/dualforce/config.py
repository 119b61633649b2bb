"""Typed configuration of the DualForce family: the user's config, and the spec it resolves to.

:class:`DualForceConfig` is what a user writes under ``train:`` (``family: dualforce``); it
names the training stage (§9: ``stage1`` structure projector, ``stage2`` causal video
backbone, ``stage3`` multi-modal diffusion forcing), a size preset and the noise, loss, LoRA,
sampler and augmentation settings. :class:`DualForceSpec` is what rebuilds a network: the
resolved :class:`DualForceArch` (preset sizes plus the shapes read from the training data)
and the settings sampling needs. Names follow diffusers' ``WanTransformer3DModel`` config
where the two models share a concept (``in_channels``, ``patch_size``,
``num_attention_heads``, ``attention_head_dim``, ``ffn_dim``, ``num_layers``, ``freq_dim``,
``eps``, ``image_dim``, ``cross_attn_norm``, ``qk_norm``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from generators.family_config import FamilyConfig, ModelSpec

FAMILY = "dualforce"
Stage = Literal["stage1", "stage2", "stage3"]
PARENT_STAGE: dict[str, str | None] = {"stage1": None, "stage2": "stage1", "stage3": "stage2"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DualForceArch(_Strict):
    """Every size of the network (data-derived shapes included).

    Video stream (Wan-style backbone): latent frames ``(in_channels, latent_height,
    latent_width)`` patchified by ``patch_size = (1, ph, pw)`` (one temporal patch: every
    frame is its own block of tokens, which block-causal generation needs) into tokens of
    width ``num_attention_heads · attention_head_dim``. Structure stream:
    ``struct_tokens_per_frame`` tokens of width ``struct_heads · struct_head_dim`` from an MLP
    of the ``struct_latent_dim`` structure latent (stage 1's projection of the
    ``motion_dim`` LivePortrait columns). Audio: HuBERT ``(T, audio_steps_per_frame,
    audio_dim)`` pooled per frame into ``audio_tokens_per_frame`` tokens of width
    ``audio_token_dim``. Reference: DINOv2 patch tokens (width ``image_dim``) pooled to a
    ``reference_grid²`` grid, plus (``reference_latent``) the reference frame's own VAE latent
    patches. Blocks ``< fusion_depth`` are shallow (cross-modal fusion), the rest deep.
    Self-attention sees the last ``window_frames`` frames (the current one included): that is
    the KV cache's length, so generation memory stops growing after ``window_frames``.
    """

    in_channels: int = Field(16, ge=1)
    latent_height: int = Field(32, ge=1)
    latent_width: int = Field(32, ge=1)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = Field(16, ge=1)
    attention_head_dim: int = Field(128, ge=2)
    ffn_dim: int = Field(8192, ge=1)
    num_layers: int = Field(28, ge=1)
    fusion_depth: int = Field(8, ge=0)
    freq_dim: int = Field(256, ge=2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    rope_theta: float = 10000.0
    window_frames: int = Field(32, ge=1)
    struct_latent_dim: int = Field(128, ge=1)
    struct_tokens_per_frame: int = Field(8, ge=1)
    struct_heads: int = Field(8, ge=1)
    struct_head_dim: int = Field(64, ge=2)
    struct_ffn_dim: int = Field(1024, ge=1)
    projector_hidden_dim: int = Field(256, ge=1)
    flame_head_dim: int = Field(256, ge=1)
    motion_dim: int = 133
    flame_dim: int = 159
    audio_dim: int = Field(1024, ge=1)
    audio_steps_per_frame: int = Field(2, ge=1)
    audio_tokens_per_frame: int = Field(4, ge=1)
    audio_token_dim: int = Field(512, ge=1)
    image_dim: int = Field(1024, ge=1)
    reference_grid: int = Field(4, ge=1)
    reference_latent: bool = True
    lip_embed_dim: int = Field(256, ge=1)
    mouth_box: tuple[float, float, float, float] = Field(
        (0.55, 0.95, 0.2, 0.8),
        description="mouth region as (top, bottom, left, right) fractions of the latent frame",
    )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def struct_dim(self) -> int:
        return self.struct_heads * self.struct_head_dim

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    @model_validator(mode="after")
    def _check(self) -> DualForceArch:
        pt, ph, pw = self.patch_size
        if pt != 1:
            raise ValueError("patch_size[0] must be 1: every frame is one block of tokens")
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(
                f"latent {self.latent_height}x{self.latent_width} is not a multiple of the "
                f"patch {ph}x{pw}"
            )
        if self.fusion_depth > self.num_layers:
            raise ValueError(f"fusion_depth {self.fusion_depth} > num_layers {self.num_layers}")
        top, bottom, left, right = self.mouth_box
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise ValueError(f"mouth_box {self.mouth_box} is not a box inside [0, 1]^2")
        return self


# Sizes a user picks by name; the data fills in channels, latent size and feature widths.
# "mova_lite" is the seed's §7.3 size (28 blocks of width 2048, 8 shallow: ~2 B parameters);
# "tiny" is a few thousand parameters per block, for CPU tests and the embedded default.
SIZE_PRESETS: dict[str, dict[str, object]] = {
    "mova_lite": {},
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        ffn_dim=64,
        num_layers=3,
        fusion_depth=2,
        freq_dim=32,
        window_frames=8,
        struct_latent_dim=8,
        struct_tokens_per_frame=2,
        struct_heads=2,
        struct_head_dim=8,
        struct_ffn_dim=32,
        projector_hidden_dim=64,
        flame_head_dim=32,
        audio_tokens_per_frame=2,
        audio_token_dim=16,
        reference_grid=2,
        lip_embed_dim=16,
    ),
}


class NoiseConfig(_Strict):
    """Per-frame noise levels of Diffusion Forcing (§6.1.2): ``σ_v ~ U(0, video_max)``,
    ``σ_s ~ U(0, struct_max)``; audio and reference are never noised."""

    video_max: float = Field(1.0, gt=0, le=1)
    struct_max: float = Field(0.7, gt=0, le=1)


class LossWeights(_Strict):
    """``L = video·L_video + struct·L_struct + flame·L_flame + lip·L_lip`` (§6.1.3, §9)."""

    video: float = Field(1.0, ge=0)
    struct: float = Field(0.5, ge=0)
    flame: float = Field(0.1, ge=0)
    lip: float = Field(0.3, ge=0)
    lip_temperature: float = Field(0.07, gt=0)
    lip_min_shift: int = Field(2, ge=1)
    lip_max_shift: int = Field(10, ge=1)
    lip_negatives: int = Field(4, ge=1)
    audio_dropout: float = Field(0.1, ge=0, lt=1, description="drop audio per clip, for CFG")
    stage1_flame: float = Field(0.5, ge=0, description="stage 1: FLAME regression weight")

    @model_validator(mode="after")
    def _check(self) -> LossWeights:
        if self.lip_min_shift > self.lip_max_shift:
            raise ValueError("lip_min_shift > lip_max_shift")
        return self


class LoraSettings(_Strict):
    """Stage 3 LoRA on the video backbone (peft): attention and FFN ranks (§9). Its learning
    rate is the train section's ``lr_groups`` entry for ``.*lora_.*`` parameters."""

    attention_rank: int = Field(64, ge=1)
    ffn_rank: int = Field(32, ge=1)
    alpha_over_rank: float = Field(1.0, gt=0)


class SamplerConfig(_Strict):
    """Autoregressive sampling: ``steps_per_frame`` Euler steps per frame (video σ 1 → 0,
    structure ``struct_start_sigma`` → 0 on the same grid, scaled), classifier-free guidance on
    audio with weight ``audio_guidance`` (1.0 = off) and a ``seed`` for the noise."""

    steps_per_frame: int = Field(20, ge=1)
    struct_start_sigma: float = Field(0.7, gt=0, le=1)
    audio_guidance: float = Field(1.0, ge=0)
    shift: float = Field(1.0, gt=0, description="σ schedule shift, σ' = sσ / (1 + (s-1)σ)")
    seed: int = 0


class AugmentConfig(_Strict):
    """§8.5 training augmentations, each with its probability (see
    :mod:`~generators.dualforce.augment`; background noise at ``noise_snr_db``:
    :mod:`~generators.dualforce.audio_noise`, which needs each clip's wav and HuBERT)."""

    p_temporal_crop: float = Field(0.3, ge=0, le=1)
    min_crop_frames: int = Field(16, ge=1)
    p_speed: float = Field(0.1, ge=0, le=1)
    speed_range: tuple[float, float] = (0.8, 1.2)
    p_color: float = Field(0.2, ge=0, le=1)
    color_strength: float = Field(0.1, ge=0)
    p_flip: float = Field(0.1, ge=0, le=1)
    p_noise: float = Field(0.15, ge=0, le=1)
    noise_snr_db: float = 15.0
    p_random_reference: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.speed_range
        if not 0 < lo <= hi:
            raise ValueError(f"speed_range {self.speed_range} must satisfy 0 < lo <= hi")
        return self


class DualForceConfig(FamilyConfig):
    """The ``train:`` fields of the DualForce family (merged with the train stage's own)."""

    family: Literal["dualforce"] = FAMILY
    training_stage: Stage = Field("stage3", description="§9 stage this run trains")
    size: Literal["tiny", "mova_lite"] = "tiny"
    fusion_depth: int | None = Field(None, ge=0, description="override the preset's (ablation)")
    window_frames: int | None = Field(None, ge=1, description="override the preset's")
    clip_frames: int = Field(32, ge=2, description="frames per training clip")
    noise: NoiseConfig = NoiseConfig()
    losses: LossWeights = LossWeights()
    lora: LoraSettings = LoraSettings()
    sampler: SamplerConfig = SamplerConfig()
    augment: AugmentConfig = AugmentConfig()

    def arch(self, **shapes: object) -> DualForceArch:
        """The preset's sizes, this config's overrides and the data's ``shapes``."""
        values = dict(SIZE_PRESETS[self.size])
        if self.fusion_depth is not None:
            values["fusion_depth"] = self.fusion_depth
        if self.window_frames is not None:
            values["window_frames"] = self.window_frames
        values.update(shapes)
        return DualForceArch(**values)


class DualForceSpec(ModelSpec):
    """Rebuilds a DualForce network: its stage (which modules exist and train, LoRA or not)."""

    family: Literal["dualforce"] = FAMILY
    training_stage: Stage
    arch: DualForceArch
    clip_frames: int
    lora: LoraSettings
    sampler: SamplerConfig
