"""Typed configuration of the DualForce family: architecture, noise, losses, LoRA, sampling.

Every number the model, its objectives and its sampler use comes from here (pydantic,
``extra="forbid"``). :func:`tiny_arch` is the size the tests build; :func:`mova_lite_arch` is
the seed's MOVA-Lite size (§7.3: 28 blocks, 8 shallow fusion blocks, a ~2 B dense Wan-style
video backbone plus a narrow structure stream), buildable on the meta device to count it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DualForceArch(_Strict):
    """Sizes of the two streams and the conditioning inputs.

    Video stream (the Wan-style backbone): latent frames ``(C, H, W)`` patchified by
    ``patch_size`` into ``(H/ph)·(W/pw)`` tokens of width ``num_attention_heads ·
    attention_head_dim``. Structure stream: ``struct_tokens_per_frame`` tokens of width
    ``struct_heads · struct_head_dim`` from an MLP of the ``struct_latent_dim`` structure
    latent (stage 1's projector of the 133 LivePortrait motion columns). Audio: HuBERT
    ``(T, audio_steps_per_frame, audio_dim)`` pooled per frame, projected to
    ``audio_tokens_per_frame`` tokens of width ``audio_token_dim``. Reference: DINOv2 CLS +
    patch tokens of width ``reference_dim``. Blocks ``< fusion_depth`` are shallow (cross-modal
    fusion), the rest deep. Temporal self-attention sees the last ``window_frames`` frames
    (the current one included); that is also the KV-cache length, so generation memory stops
    growing after ``window_frames``.
    """

    latent_channels: int = 16
    patch_size: tuple[int, int] = (2, 2)
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    ffn_dim: int = 8192
    num_layers: int = 28
    fusion_depth: int = 8
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    window_frames: int = 32
    struct_latent_dim: int = 128
    struct_tokens_per_frame: int = 8
    struct_heads: int = 8
    struct_head_dim: int = 64
    struct_ffn_dim: int = 1024
    motion_dim: int = 133
    flame_dim: int = 159
    audio_dim: int = 1024
    audio_steps_per_frame: int = 2
    audio_tokens_per_frame: int = 4
    audio_token_dim: int = 512
    reference_dim: int = 1024
    lip_embed_dim: int = 256
    mouth_box: tuple[float, float, float, float] = Field(
        default=(0.55, 0.95, 0.2, 0.8),
        description="mouth region as (top, bottom, left, right) fractions of the latent frame",
    )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def struct_dim(self) -> int:
        return self.struct_heads * self.struct_head_dim

    @model_validator(mode="after")
    def _check(self) -> DualForceArch:
        if not 0 <= self.fusion_depth <= self.num_layers:
            raise ValueError(f"fusion_depth {self.fusion_depth} not in [0, {self.num_layers}]")
        if self.window_frames < 1:
            raise ValueError("window_frames must be >= 1")
        top, bottom, left, right = self.mouth_box
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise ValueError(f"mouth_box {self.mouth_box} is not a box inside [0, 1]^2")
        return self


def tiny_arch(**overrides: object) -> DualForceArch:
    """A few-thousand-parameter-per-block model for CPU tests and benchmarks."""
    base: dict[str, object] = dict(
        latent_channels=4,
        patch_size=(2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        ffn_dim=48,
        num_layers=3,
        fusion_depth=2,
        freq_dim=32,
        window_frames=8,
        struct_latent_dim=8,
        struct_tokens_per_frame=2,
        struct_heads=2,
        struct_head_dim=8,
        struct_ffn_dim=32,
        audio_dim=16,
        audio_tokens_per_frame=2,
        audio_token_dim=16,
        reference_dim=16,
        lip_embed_dim=16,
    )
    base.update(overrides)
    return DualForceArch(**base)


def mova_lite_arch() -> DualForceArch:
    """The seed's MOVA-Lite size (§7.3); the class defaults are exactly that size."""
    return DualForceArch()


class NoiseConfig(_Strict):
    """Per-frame noise levels of Diffusion Forcing (§6.1.2): ``σ_v ~ U(0, video_max)``,
    ``σ_s ~ U(0, struct_max)``; audio and reference are never noised."""

    video_max: float = Field(1.0, gt=0, le=1)
    struct_max: float = Field(0.7, gt=0, le=1)


class LossWeights(_Strict):
    """``L = video + struct·L_struct + flame·L_flame + lip·L_lip`` (§6.1.3, §9 stage 3)."""

    video: float = 1.0
    struct: float = 0.5
    flame: float = 0.1
    lip: float = 0.3
    lip_temperature: float = Field(0.07, gt=0)
    lip_min_shift: int = Field(2, ge=1)
    lip_max_shift: int = Field(10, ge=1)
    lip_negatives: int = Field(4, ge=1)
    audio_dropout: float = Field(0.1, ge=0, lt=1, description="drop audio per sample, for CFG")


class Stage1Config(_Strict):
    """Structure projector training: motion reconstruction + FLAME regression."""

    flame_weight: float = 0.5
    hidden_dim: int = 256
    lr: float = 1e-3


class LoraSettings(_Strict):
    """Stage 3 LoRA on the video backbone (peft): attention and FFN ranks (§9)."""

    attention_rank: int = Field(64, ge=1)
    ffn_rank: int = Field(32, ge=1)
    alpha_over_rank: float = 1.0
    lr_lora: float = 5e-5
    lr_new: float = 1e-4


class SamplerConfig(_Strict):
    """Autoregressive sampling: ``steps_per_frame`` Euler steps from σ=1 to 0 per frame, the
    structure stream starting at ``struct_start_sigma`` (it is trained on σ_s ≤ 0.7), and
    classifier-free guidance on audio with ``audio_guidance`` (1.0 = off)."""

    steps_per_frame: int = Field(20, ge=1)
    struct_start_sigma: float = Field(0.7, gt=0, le=1)
    audio_guidance: float = Field(1.0, ge=0)
    shift: float = Field(1.0, gt=0, description="σ schedule shift, σ' = sσ / (1 + (s-1)σ)")


class AugmentConfig(_Strict):
    """§8.5 training augmentations, each with its probability."""

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


class DualForceConfig(_Strict):
    """Everything the DualForce family needs, one record."""

    arch: DualForceArch = DualForceArch()
    noise: NoiseConfig = NoiseConfig()
    losses: LossWeights = LossWeights()
    stage1: Stage1Config = Stage1Config()
    lora: LoraSettings = LoraSettings()
    sampler: SamplerConfig = SamplerConfig()
    augment: AugmentConfig = AugmentConfig()
